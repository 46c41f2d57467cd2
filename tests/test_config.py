from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from medvae.config import IngestConfig, PipelineConfig, TrainConfig, load_config, parse_overrides


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_overrides(["epochs=3", "loss.beta=0.5", "compile=true", "channels=[8,16]"]) == {
        "epochs": 3,
        "loss": {"beta": 0.5},
        "compile": True,
        "channels": [8, 16],
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["epochs"])


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


def test_configs_dir_validates() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ must hold the stage YAML files"
    for f in files:
        cls = {"pipeline": PipelineConfig, "ingest": IngestConfig, "train": TrainConfig}.get(f.stem)
        if cls is not None:
            load_config(cls, f)


def test_configs_are_frozen() -> None:
    cfg = IngestConfig()
    with pytest.raises(ValidationError):
        cfg.size = 32  # type: ignore[misc]
