"""Model directories: round trip, content hash, tamper detection, signatures and refusal of pickles."""

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
    SIGNATURE,
    WEIGHTS,
    finalize,
    load_model,
    model_hash,
    package_versions,
    read_json,
    read_tensors,
    save_model_dir,
    sign,
    store_key,
    verify_signature,
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
    assert names == [
        "config.json",
        "hash.txt",
        "meta.json",
        "metrics.json",
        "timing.json",
        "versions.json",
        WEIGHTS,
    ]
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


# ====================================================================== reproducible hash, signature


def test_the_same_weights_give_the_same_hash(tmp_path: Path) -> None:
    # safetensors keeps its metadata in a hash map whose order changes from one save to the next: the
    # header is written sorted, so a dozen saves of one model are one file and one hash.
    cfg = _cfg()
    model = _trained_like(cfg)
    hashes, weights = set(), set()
    for i in range(12):
        out = tmp_path / f"m{i}"
        save_model_dir(out, model, cfg, label_names=["A"], dataset={"store": "s"}, metrics={})
        hashes.add(model_hash(out, verify=True))
        weights.add((out / WEIGHTS).read_bytes())
    assert len(weights) == 1 and len(hashes) == 1
    (header,) = {w[8 : 8 + int.from_bytes(w[:8], "little")] for w in weights}
    meta = json.loads(header)["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) >= 2
    assert read_tensors(tmp_path / "m0", WEIGHTS).keys() == model.state_dict().keys()


def test_a_rerun_on_a_busier_machine_gives_the_same_hash(tmp_path: Path) -> None:
    """The same weights trained at another speed: the wall clock goes to timing.json, outside the hash."""
    cfg = _cfg()
    model = _trained_like(cfg)
    hashes = []
    for i, secs in enumerate((0.41, 0.93)):
        history = [{"epoch": 0, "loss": 1.5, "seconds": secs, "img_per_s": 64 / secs}]
        metrics = {"history": history, "best": history[0], "best_epoch": 0}
        out = tmp_path / f"m{i}"
        save_model_dir(out, model, cfg, label_names=["A"], dataset={"store": "s"}, metrics=metrics)
        hashes.append(model_hash(out, verify=True))
        assert json.loads((out / "metrics.json").read_text())["history"] == [{"epoch": 0, "loss": 1.5}]
        timing = json.loads((out / "timing.json").read_text())
        assert timing["history"][0] == {"seconds": secs, "img_per_s": 64 / secs}
        assert timing["best"]["seconds"] == secs
    assert hashes[0] == hashes[1]
    (tmp_path / "m1" / "timing.json").write_text("{}")  # a run record, not model content
    assert model_hash(tmp_path / "m1", verify=True) == hashes[0]


def test_signed_model_verifies_under_its_store_key_only(tmp_path: Path) -> None:
    from medvae.data.store import Store

    out, _, _ = _save(tmp_path)
    key = Store(tmp_path / "store").key()
    other = Store(tmp_path / "other").key()
    assert store_key(str(tmp_path / "store")) == key
    assert store_key(str(tmp_path / "nowhere")) is None and store_key(None) is None
    sig = sign(out, key)
    assert (out / SIGNATURE).read_text().splitlines()[0] == sig
    assert model_hash(out, verify=True)  # the signature is not part of the content hash
    assert load_model(out, key=key).signature == "verified"
    assert load_model(out).signature == "not checked"
    with pytest.raises(ValueError, match="signed with the key of another store") as exc:
        load_model(out, key=other)
    assert "\n" not in str(exc.value)


def test_a_model_changed_after_signing_is_refused(tmp_path: Path) -> None:
    from medvae.data.store import Store

    out, _, _ = _save(tmp_path)
    key = Store(tmp_path / "store").key()
    sign(out, key)
    # Whoever can write the directory can refresh hash.txt, so the hash alone accepts the change ...
    write_json(out, "calibration.json", {"threshold": 99.0})
    assert load_model(out).hash == model_hash(out, verify=True)
    # ... but cannot make a signature without the store's key.
    with pytest.raises(ValueError, match="files changed after it was signed"):
        load_model(out, key=key)
    with pytest.raises(ValueError, match="files changed after it was signed"):
        verify_signature(out, key)
    sign(out, key)  # signed again by the key holder: accepted
    assert verify_signature(out, key)


def test_unsigned_models_load_unless_a_signature_is_required(tmp_path: Path) -> None:
    from medvae.data.store import Store

    out, _, _ = _save(tmp_path)
    key = Store(tmp_path / "store").key()
    assert not verify_signature(out, key)
    assert load_model(out, key=key).signature == "unsigned"
    with pytest.raises(ValueError, match="refusing an unsigned model"):
        load_model(out, key=key, require_signature=True)
    with pytest.raises(ValueError, match="valid model-directory file name"):
        write_json(out, SIGNATURE, {})


def test_config_written_before_conditioning_existed_loads_as_concat(tmp_path: Path) -> None:
    # A conditional model of the old architecture: the one-hot on z only, no encoder label planes.
    base = _cfg(conditional=True)
    old = base.model_copy(
        update={
            "model": base.model.model_copy(update={"conditioning": "concat", "encoder_label_planes": False})
        }
    )
    model = _trained_like(old)
    out = tmp_path / "old"
    save_model_dir(out, model, old, label_names=["A", "B"], dataset={}, metrics={})
    raw = json.loads((out / "config.json").read_text())
    del raw["model"]["conditioning"], raw["model"]["encoder_label_planes"]
    write_json(out, "config.json", raw)  # as an earlier medvae wrote it, hash refreshed
    loaded = load_model(out)
    assert loaded.cfg.model.conditioning == "concat" and loaded.cfg.model.encoder_label_planes is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    # A config that names the fields keeps them (new configs always do).
    assert load_model(_save(tmp_path / "new", conditional=True)[0]).cfg.model.conditioning == "cbn"
