from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from medvae.config import (
    EvaluateConfig,
    IngestConfig,
    PipelineConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    to_jsonable,
)


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_overrides(["epochs=3", "loss.beta=0.5", "compile=true", "channels=[8,16]"]) == {
        "epochs": 3,
        "loss": {"beta": 0.5},
        "compile": True,
        "channels": [8, 16],
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["epochs"])
    # Not YAML (an alias marker, an unclosed bracket): the literal text, which validation then judges.
    assert parse_overrides(["schedule=* * * * *", "patient_regex=^(ab"]) == {
        "schedule": "* * * * *",
        "patient_regex": "^(ab",
    }


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("epochs: 7\nloss:\n  beta: 2.0\n  reconstruction: mse\n")
    cfg = load_config(TrainConfig, f, ["loss.beta=0.25"])
    assert cfg.epochs == 7 and cfg.loss.beta == 0.25 and cfg.loss.reconstruction == "mse"
    assert cfg.model.channels == (32, 64, 128, 256) and cfg.model.latent_dim == 128


def test_unknown_keys_and_bad_values_fail(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_config(TrainConfig, None, ["epochz=3"])
    with pytest.raises(ValidationError):
        load_config(IngestConfig, None, ["split_fractions=[0.5,0.5,0.5]"])
    with pytest.raises(ValidationError):
        load_config(TrainConfig, None, ["model.image_size=60"])  # not divisible by 2**4


STAGES = {
    "pipeline": PipelineConfig,
    "ingest": IngestConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}


def _restated(data: dict, default: dict, at: str = "") -> list[str]:
    """Keys of a YAML mapping whose value equals the model's default (a second source of defaults)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            out += _restated(v, default[k], f"{at}{k}.")
        elif k in default and v == default[k]:
            out.append(f"{at}{k}")
    return out


def test_configs_dir_validates_and_restates_no_default() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {f.stem for f in files} == set(STAGES), "configs/ holds one YAML per stage"
    for f in files:
        cls = STAGES[f.stem]
        load_config(cls, f)  # validates
        data = yaml.safe_load(f.read_text()) or {}
        defaults = to_jsonable(cls())
        assert _restated(yaml.safe_load(yaml.safe_dump(data, default_flow_style=None)), defaults) == [], (
            f.name
        )


def test_the_restated_default_check_can_fail() -> None:
    assert _restated(
        {"epochs": 30, "loss": {"beta": 1.0, "kl_warmup_epochs": 9}}, to_jsonable(TrainConfig())
    ) == [
        "epochs",
        "loss.beta",
    ]


def test_configs_are_frozen() -> None:
    cfg = IngestConfig()
    with pytest.raises(ValidationError):
        cfg.size = 32  # type: ignore[misc]
