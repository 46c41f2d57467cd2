"""Model directories: round trip, content hash, tamper detection and refusal of pickles."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from medvae.config import ModelConfig, TrainConfig
from medvae.vae.artifacts import (
    HASH,
    WEIGHTS,
    finalize,
    load_model,
    model_hash,
    package_versions,
    read_json,
    read_tensors,
    save_model_dir,
    write_json,
    write_tensors,
)
from medvae.vae.model import ConvVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(conditional: bool = False) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            image_size=16,
            channels=(8, 16),
            latent_dim=4,
            conditional=conditional,
            num_classes=2 if conditional else 0,
        ),
        device="cpu",
    )


def _trained_like(cfg: TrainConfig) -> ConvVAE:
    """A model with non-default weights and BatchNorm statistics, in channels-last as training leaves it."""
    torch.manual_seed(0)
    model = ConvVAE(cfg.model).to(memory_format=torch.channels_last)
    y = torch.arange(8) % 2 if cfg.model.conditional else None
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 16, 16), y)  # moves the running statistics off their defaults
    return model.eval()


def _save(tmp_path: Path, conditional: bool = False) -> tuple[Path, ConvVAE, TrainConfig]:
    cfg = _cfg(conditional)
    model = _trained_like(cfg)
    out = tmp_path / "model"
    save_model_dir(
        out,
        model,
        cfg,
        label_names=["NORMAL", "PNEUMONIA"],
        dataset={"store": "runs/store", "version": 3, "where": {"origin": "real"}, "train_rows": 8},
        metrics={"history": [{"epoch": 0, "loss": 1.5}], "best_epoch": 0},
    )
    return out, model, cfg


@pytest.mark.parametrize("conditional", [False, True])
def test_round_trip_gives_identical_outputs(tmp_path: Path, conditional: bool) -> None:
    out, model, cfg = _save(tmp_path, conditional)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "hash.txt", "meta.json", "metrics.json", "versions.json", WEIGHTS]
    loaded = load_model(out)
    assert not loaded.model.training
    assert loaded.cfg == cfg
    assert loaded.label_names == ["NORMAL", "PNEUMONIA"]
    assert loaded.meta["dataset"]["version"] == 3 and loaded.meta["created_by"].startswith("medvae ")
    assert loaded.hash == model_hash(out) and len(loaded.hash) == 64
    x = torch.rand(5, 1, 16, 16)
    y = torch.tensor([0, 1, 1, 0, 1]) if conditional else None
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    # Same weights in the same memory format give bit-identical outputs (channels-last kernels round
    # differently from the contiguous ones the loaded model uses).
    model = model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        a, b = model(x, y), loaded.model(x, y)
    for t1, t2 in zip(a, b, strict=True):
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)


def test_json_and_tensor_helpers_refresh_the_hash(tmp_path: Path) -> None:
    out, _, _ = _save(tmp_path)
    h0 = model_hash(out, verify=True)
    write_json(out, "calibration.json", {"threshold": 1.25})
    h1 = model_hash(out, verify=True)
    write_tensors(out, "calibration.safetensors", {"mean": torch.arange(3.0), "cov": torch.eye(3).t()})
    h2 = model_hash(out, verify=True)
    assert len({h0, h1, h2}) == 3
    assert read_json(out, "calibration.json") == {"threshold": 1.25}
    t = read_tensors(out, "calibration.safetensors")
    torch.testing.assert_close(t["cov"], torch.eye(3))
    assert finalize(out) == h2  # deterministic over the same files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(ValueError, match="valid model-directory file name"):
        write_json(out, "../escape.json", {})
    with pytest.raises(ValueError, match="valid model-directory file name"):
        write_tensors(out, "x.pt", {})


def test_resave_drops_stale_calibration(tmp_path: Path) -> None:
    out, _, _ = _save(tmp_path)
    write_json(out, "calibration.json", {"threshold": 1.0})
    _save(tmp_path)
    assert not (out / "calibration.json").exists()
    model_hash(out, verify=True)


def test_checkpoint_subdirectory_is_not_hashed(tmp_path: Path) -> None:
    out, _, _ = _save(tmp_path)
    h = model_hash(out)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "checkpoint.pt").write_bytes(b"training state")
    assert model_hash(out, verify=True) == h


def _tampered(path: Path) -> bytes:
    if path.suffix == ".json":  # still valid JSON (and a valid config), only one value differs
        obj = json.loads(path.read_text())
        obj["lr" if "lr" in obj else "best_epoch"] = 0.5
        return json.dumps(obj).encode()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    return bytes(data)


@pytest.mark.parametrize("target", ["config.json", WEIGHTS, "metrics.json"])
def test_tampering_is_detected(tmp_path: Path, target: str) -> None:
    out, _, _ = _save(tmp_path)
    h = model_hash(out)
    path = out / target
    original = path.read_bytes()
    path.write_bytes(_tampered(path))
    with pytest.raises(ValueError, match=target.replace(".", r"\.")):
        model_hash(out, verify=True)
    with pytest.raises(ValueError, match="does not match"):
        load_model(out)
    load_model(out, verify=False)  # it parses: only the hash can tell
    assert model_hash(out) == h  # hash.txt itself is untouched ...
    assert finalize(out) != h  # ... but the content hash depends on every byte of every file
    path.write_bytes(original)
    assert finalize(out) == h
    assert load_model(out).hash == h


def test_added_file_changes_the_hash(tmp_path: Path) -> None:
    out, _, _ = _save(tmp_path)
    (out / "extra.json").write_text("{}")
    with pytest.raises(ValueError, match=r"extra\.json"):
        load_model(out)


class _Evil:
    """Unpickling this runs a shell command: what a malicious .pt file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"state_dict": _Evil(marker)}, evil / "weights.pt")
    torch.save({"model": _Evil(marker)}, evil / "checkpoint.pt")

    # A directory of pickles is not a model directory: refused before anything is read.
    with pytest.raises(FileNotFoundError, match=r"no weights\.safetensors.*never loaded"):
        load_model(evil)
    # The safe loader refuses the payload instead of running it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil / "weights.pt", weights_only=True)
    assert not marker.exists()

    # A pickle disguised as our layout, with a valid hash, is still never unpickled.
    out, _, _ = _save(tmp_path)
    (out / WEIGHTS).write_bytes((evil / "weights.pt").read_bytes())
    (out / "raw.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    finalize(out)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_model(out)
    assert not marker.exists()


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no weights\.safetensors"):
        load_model(tmp_path / "empty")
    out, _, _ = _save(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    meta["format"] = "something-else"
    write_json(out, "meta.json", meta)
    with pytest.raises(ValueError, match="does not describe"):
        load_model(out)


def test_weights_must_fit_config(tmp_path: Path) -> None:
    out, _, cfg = _save(tmp_path)
    other = cfg.model_dump(mode="json")
    other["model"]["latent_dim"] = 5
    write_json(out, "config.json", other)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(out)
    (out / HASH).unlink()
    with pytest.raises(FileNotFoundError, match=r"hash\.txt"):
        load_model(out)


def test_package_versions() -> None:
    v = package_versions()
    assert v["torch"] == torch.__version__
    for key in ("python", "numpy", "medvae", "platform"):
        assert v[key]
    assert all(isinstance(x, str) for x in v.values())
    json.dumps(v)
