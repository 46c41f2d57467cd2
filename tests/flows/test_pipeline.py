from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from medvae.cli import app
from medvae.data.store import Store

TINY_TRAIN = {
    "model": {"channels": [8, 16, 32, 32], "latent_dim": 8},
    "epochs": 2,
    "batch_size": 16,
    "patience": 2,
    "device": "cpu",
}


def _tiny_sample(sample_dir: Path, dest: Path) -> Path:
    """A few real files per folder of the bundled sample: the flow runs on real scans, just fewer."""
    for folder, n in (("normal", 24), ("pneumonia", 4), ("dicom_examples", 3)):
        (dest / folder).mkdir(parents=True)
        for f in sorted((sample_dir / folder).iterdir())[:n]:
            shutil.copy(f, dest / folder / f.name)
    return dest


@pytest.mark.integration
def test_pipeline_flow_end_to_end(prefect_harness: None, sample_dir: Path, tmp_path: Path) -> None:
    from flows.pipeline import pipeline_flow

    src = _tiny_sample(sample_dir, tmp_path / "src")
    store = tmp_path / "store"
    cfg = {
        "sources": [str(src)],
        "store": str(store),
        "model_dir": str(tmp_path / "model"),
        "train_where": {"label": "normal"},
        "ingest": {"workers": 1},
        "train": TINY_TRAIN,
        "augment": {"count": 12, "seed": 1},
    }
    res = pipeline_flow(cfg)
    s = Store(store)
    hist = s.history()
    assert [h.operation for h in hist] == ["ingest", "pipeline"]
    assert res.version == 1
    v0, v1 = s.read(version=0), s.read(version=1)
    real = v1.filter(v1.column("origin").to_numpy(zero_copy_only=False) == "real")
    syn = v1.filter(v1.column("origin").to_numpy(zero_copy_only=False) == "synthetic")
    assert real.num_rows == v0.num_rows  # no real row lost or duplicated
    assert syn.num_rows == res.synthetic_rows > 0
    assert set(syn.column("label").to_pylist()) == {"normal"}
    assert set(syn.column("model_hash").to_pylist()) == {res.model_hash}
    assert all(v is not None for v in real.column("anomaly_score").to_pylist())
    assert all(v is None for v in v0.column("anomaly_score").to_pylist())  # time travel: v0 unchanged
    lin = hist[1].lineage
    assert lin["model_hash"] == res.model_hash and "privacy" in lin and "screen" in lin
    assert str(src) not in repr(lin)  # source paths are redacted from lineage
    model = tmp_path / "model"
    for name in ("weights.safetensors", "config.json", "metrics.json", "calibration.json", "versions.json"):
        assert (model / name).is_file(), name
    # Pictures in the model directory are synthetic samples only: no real scan is ever saved there.
    assert sorted(p.name for p in (model / "pictures").iterdir()) == ["samples_normal.png"]


@pytest.mark.integration
def test_train_augment_screen_cli(sample_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    src = _tiny_sample(sample_dir, tmp_path / "src")
    store, model = str(tmp_path / "store"), tmp_path / "model"
    assert runner.invoke(app, ["ingest", str(src), "--store", store, "--workers", "1"]).exit_code == 0
    sets = ["--set", "model.channels=[8,16,32,32]", "--set", "model.latent_dim=8", "--set", "batch_size=16"]
    res = runner.invoke(
        app,
        ["train", "--store", store, "--where", "label=normal", "--out", str(model), "--epochs", "2", *sets],
    )
    assert res.exit_code == 0, res.output
    assert "trained on cpu" in res.output

    dcm = tmp_path / "dcm"
    res = runner.invoke(
        app, ["augment", "--model", str(model), "--store", store, "--count", "6", "--dicom", str(dcm)]
    )
    assert res.exit_code == 0, res.output
    files = sorted(dcm.rglob("*.dcm"))
    syn_ids = set(Store(store).read(where={"origin": "synthetic"}).column("id").to_pylist())
    assert files and {f.stem for f in files} <= syn_ids  # named by row id, and every one has its row
    ds = pydicom.dcmread(files[0])
    assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    assert ds.pixel_array.shape == (64, 64)

    out = tmp_path / "scores.csv"
    heat = tmp_path / "heat"
    scan_dir = src / "dicom_examples"
    res = runner.invoke(
        app, ["screen", str(scan_dir), "--model", str(model), "--out", str(out), "--heatmaps", str(heat)]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(scan_dir.iterdir()))
    scored = [r for r in rows if r["status"] == "scored"]
    assert scored and all(0.0 <= float(r["percentile"]) <= 100.0 for r in scored)
    assert len(list(heat.glob("*.png"))) == len(scored)

    res = runner.invoke(app, ["versions", "--store", store, "--json"])
    assert '"augment"' in res.output
