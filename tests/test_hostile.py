"""Hostile inputs: pickles planted in model directories, labels and config values shaped like paths.

Every test here first proves that its check can fail (a planted payload would leave a marker file; an
escaping write would leave a file outside the allowed folders), then runs medvae and asserts neither happens.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import ModelConfig, TrainConfig
from medvae.synth.dicom import write_synthetic_dicom
from medvae.vae.artifacts import WEIGHTS, finalize, save_model_dir
from medvae.vae.model import ConvVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Labels an attacker (or a careless CSV) could supply: each would escape a naive out/<label>/ join.
HOSTILE_LABELS = ("../../evil", "..", "/tmp/evil_abs", "a/../../b", "..\\..\\evil_win", "./.")


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious .pt file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _invoke(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


def _tiny_model_dir(out: Path) -> Path:
    cfg = TrainConfig(model=ModelConfig(image_size=16, channels=(8, 16), latent_dim=4), device="cpu")
    torch.manual_seed(0)
    save_model_dir(
        out,
        ConvVAE(cfg.model).eval(),
        cfg,
        label_names=["normal"],
        dataset={"store": str(out.parent / "store"), "version": 0, "where": {"origin": "real"}},
        metrics={"history": [], "best_epoch": 0},
    )
    return out


# --------------------------------------------------------------------------------------- pickles
def test_evil_pickle_actually_runs_when_unpickled(tmp_path: Path) -> None:
    """The payload is live: the tests below would notice it running."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize("command", ["screen", "augment"])
def test_cli_refuses_pickled_model_dirs(command: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    scan = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(scan)

    def run(model: Path) -> str:
        if command == "screen":
            args = ["screen", str(scan), "--model", str(model), "--out", str(tmp_path / "s.csv")]
        else:
            args = ["augment", "--model", str(model), "--store", str(tmp_path / "store"), "--count", "2"]
        code, output = _invoke(args)
        assert code == 1, output
        return _one_line_error(output)

    # 1. A directory of pickles only (the usual torch.save layout): refused before anything is read.
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save({"state_dict": _Evil(marker)}, pickles / "weights.pt")
    torch.save({"model": _Evil(marker)}, pickles / "model.ckpt")
    msg = run(pickles)
    assert "never loaded" in msg or "medvae train" in msg
    # 2. Our layout, re-hashed, with the pickle disguised as the safetensors weights and a stray .pkl.
    disguised = _tiny_model_dir(tmp_path / "disguised")
    (disguised / WEIGHTS).write_bytes((pickles / "weights.pt").read_bytes())
    (disguised / "raw.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    finalize(disguised)
    assert "safetensors" in run(disguised)
    assert not marker.exists(), "a planted pickle was executed"


# --------------------------------------------------------------------------------------- paths
def _ingest_hostile_labels(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i, label in enumerate(HOSTILE_LABELS):
        img = src / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(img)
        rows.append((img.name, label))
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    store = tmp_path / "store"
    code, output = _invoke(["ingest", str(src), "--store", str(store), "--labels-csv", str(labels_csv)])
    assert code == 0, output
    return src, store


def test_export_labels_cannot_escape_the_export_folder(tmp_path: Path) -> None:
    _, store = _ingest_hostile_labels(tmp_path)
    export = tmp_path / "deep" / "er" / "export"
    before = _files(tmp_path)
    code, output = _invoke(["export", "--store", str(store), "--out", str(export)])
    assert code == 0, output
    written = _files(tmp_path) - before
    root = export.resolve()
    outside = sorted(p for p in written if root not in p.resolve().parents)
    assert not outside, f"export wrote outside {export}: {outside}"
    assert not list(Path("/tmp").glob("evil_abs*"))
    assert len([p for p in written if p.suffix == ".png"]) == len(HOSTILE_LABELS)
    # The manifest's paths (the export's report) are relative and stay inside the folder too.
    with (export / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["label"] for r in rows) == sorted(HOSTILE_LABELS)  # labels kept verbatim as data
    for r in rows:
        rel = Path(r["path"])
        assert not rel.is_absolute() and ".." not in rel.parts, r
        assert root in (export / rel).resolve().parents and (export / rel).is_file(), r


def test_the_escape_check_can_fail(tmp_path: Path) -> None:
    """The check above catches a write outside the folder (what a naive ``out / label`` join does)."""
    export = tmp_path / "a" / "b" / "export"
    export.mkdir(parents=True)
    before = _files(tmp_path)
    naive = export / HOSTILE_LABELS[0] / "x.png"
    naive.parent.mkdir(parents=True, exist_ok=True)
    naive.write_bytes(b"x")
    outside = [p for p in _files(tmp_path) - before if export.resolve() not in p.resolve().parents]
    assert outside


def test_synthetic_dicom_labels_do_not_name_files(tmp_path: Path) -> None:
    out = tmp_path / "x" / "dicom"
    before = _files(tmp_path)
    imgs = np.zeros((2, 16, 16), dtype=np.uint8)
    ids = ["0" * 16, "1" * 16]
    paths = write_synthetic_dicom(
        imgs, out, ids=ids, labels=list(HOSTILE_LABELS[:2]), model_hash="ab" * 32, seed=0
    )
    new = _files(tmp_path) - before
    assert {Path(p) for p in paths} <= new and all(p.parent.parent == out for p in new)
    # out/<batch>/<row id>.dcm (and the batch's manifest): the label never reaches the path.
    assert sorted(Path(p).relative_to(out).parts[1] for p in paths) == [f"{i}.dcm" for i in ids]
    assert all(len(Path(p).relative_to(out).parts) == 2 for p in paths)
    assert pydicom.dcmread(paths[0]).PatientIdentityRemoved == "YES"


@pytest.mark.parametrize(
    "override",
    [
        "../../evil=1",  # a key shaped like a path is an unknown key, nothing more
        "labels=../../evil",
        "intensity=../../evil",
    ],
)
def test_config_values_shaped_like_paths_are_refused(override: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(src / "a.png")
    work = tmp_path / "work"
    work.mkdir()
    before = _files(tmp_path)
    code, output = _invoke(["ingest", str(src), "--store", str(work / "store"), "--set", override])
    assert code == 1
    assert "invalid config" in _one_line_error(output)
    assert _files(tmp_path) == before  # refused before anything was written


def test_yaml_config_with_path_values_writes_only_inside_its_locations(tmp_path: Path) -> None:
    """A YAML file naming outputs with ``../`` writes only where those (resolved) locations point.

    The config's output locations (store, model, DICOM folder) are the operator's to choose; what a config
    must not do is make medvae write anywhere *else*, e.g. via a label or a file name derived from data.
    """
    _, store = _ingest_hostile_labels(tmp_path)
    cfg = tmp_path / "cfg" / "augment.yaml"
    cfg.parent.mkdir()
    cfg.write_text("count: 2\nlabel: ../../evil\n", encoding="utf-8")
    model = _tiny_model_dir(tmp_path / "model")
    before = _files(tmp_path)
    code, output = _invoke(
        ["augment", "--model", str(model), "--store", str(store), "--config", str(cfg), "--count", "0"]
    )
    written = _files(tmp_path) - before
    # Only the store may change: the label is data (written into the row), never a path.
    assert all((store.resolve() in p.resolve().parents) for p in written), (code, output, written)
