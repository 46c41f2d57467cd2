"""The shift-aware split in the evaluation: a new acquisition batch held out, and the threshold on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvae.anomaly.calibration import threshold_at_fpr
from medvae.config import EvaluateConfig, ModelConfig, ShiftSplitConfig, TrainConfig
from medvae.eval.anomaly import run_anomaly_seed
from medvae.eval.data import load_dataset, prepare
from medvae.eval.study import evaluate, summary_lines

_TINY = TrainConfig(
    model=ModelConfig(channels=(8, 16), latent_dim=4), epochs=1, batch_size=16, patience=1, device="cpu"
)


def _folder(root: Path) -> Path:
    """IM-NNNN normals, a NORMAL2-IM-NNNN batch of brighter normals, and personN pneumonia images."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    rows = [("normal", f"IM-{i:04d}-0001.png", 0.5) for i in range(1, 31)]
    rows += [("normal", f"NORMAL2-IM-{i:04d}-0001.png", 0.6) for i in range(1, 45)]
    rows += [("pneumonia", f"person{i}_bacteria_{i}.png", 0.4) for i in range(1, 41)]
    for k, (label, name, level) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        if label == "normal":
            base = level + 0.25 * np.sin(xx / 5.0 + k)
        else:
            base = level + 0.4 * (((xx // 8) + (yy // 8)) % 2)
        img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / label / name)
    return root


def _cfg(**kw: object) -> EvaluateConfig:
    return EvaluateConfig(
        seeds=(0,), anomaly=_TINY, utility=False, pictures=4, device="cpu", workers=1, bootstrap=0, **kw
    )


def test_the_new_batch_is_held_out_and_the_threshold_is_recalibrated_on_part_of_it(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    cfg = _cfg(shift=ShiftSplitConfig(local_normals=22, recalibration_draws=5), localisation_images=4)
    data, _ = load_dataset(
        root, store_version=None, ingest_cfg=cfg.ingest, workers=1, cache_dir=None, shift=cfg.shift
    )
    assert data.batches is not None and data.orders is not None
    assert sorted(set(data.batches.tolist())) == ["", "NORMAL2"]
    ed = prepare(data, "normal", cfg, "none")
    assert ed.shift is not None and ed.shift.held_out == ("NORMAL2",)
    n2 = data.batches == "NORMAL2"
    assert (ed.shift.assignment[n2] == "test").all()
    # A draw's local and unseen normals are disjoint and together make the whole new batch.
    local, unseen = ed.shift.draw(0)
    assert not set(local.tolist()) & set(unseen.tolist()) and len(local) == 22
    assert sorted([*local, *unseen]) == np.flatnonzero(n2).tolist()
    assert not np.array_equal(np.sort(local), np.sort(ed.shift.draw(1)[0]))  # draws differ

    run = run_anomaly_seed(ed, cfg, 3, "cpu", None, False, shift=ed.shift, localise=4)
    assert run.split_name == "shift" and run.cohort is not None
    at = dict(zip(run.test_index.tolist(), run.scores[run.primary].tolist(), strict=True))
    rates = []
    for r in range(5):
        loc, rest = ed.shift.draw(3 * 1000 + r)
        t = threshold_at_fpr(np.array([at[i] for i in loc.tolist()]), 0.05)
        rest_scores = np.array([at[i] for i in rest.tolist()])
        rates.append(float((rest_scores > t).mean()))
        if r == 0:
            # `medvae recalibrate`'s code path gives the threshold of the local normals' own scores,
            # and its rate is measured on the other new-batch normals only.
            assert run.cohort.recalibrated_threshold == pytest.approx(t)
            assert run.cohort.recalibrated_fpr["n"] == len(rest)
            assert run.cohort.recalibrated_fpr["k"] == int((rest_scores > t).sum())
    assert run.cohort.draws == 5 and run.cohort.metrics()["recalibrated_fpr_mean"] == pytest.approx(
        np.mean(rates)
    )
    new = np.array([at[i] for i in np.flatnonzero(n2).tolist()])
    stored = run.cohort.fpr_by_batch["NORMAL2"]
    assert stored["n"] == n2.sum() and stored["k"] == int((new > run.threshold).sum())
    assert run.localisation is not None and run.localisation.n_abnormal == 4


def test_evaluate_reports_both_splits_side_by_side(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    out = tmp_path / "out"
    m = evaluate(root, out, normal_label="normal", cfg=_cfg(localisation_images=4), progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    sh = on_disk["shift"]
    assert sh["cohort"]["held_out"] == ["NORMAL2"] and "NORMAL2" in sh["note"]
    assert sh["splits"]["test"]["by_label"]["normal"] >= 44
    assert set(sh["per_seed"][0]["cohort"]["fpr_by_batch"]) == {"(default batch)", "NORMAL2"}
    assert 0.0 <= sh["summary"]["scores"]["lowpass_error"]["auroc"]["mean"] <= 1.0
    names = {t["target"] for t in on_disk["targets"]}
    assert "shift-aware split: lowpass_error AUROC >= 0.85" in names
    loc = on_disk["anomaly"]["localisation"]
    assert loc["n_abnormal"] == 4 and loc["n_normal"] == 4
    # File names never reach the outputs (they may be patient names): batch names and numbers only.
    assert "person1_" not in json.dumps(on_disk) and "IM-0001" not in json.dumps(on_disk)
    lines = summary_lines(m)
    assert any(line.startswith("lowpass_error AUROC, patient split") for line in lines)
    assert any("recalibrated on" in line for line in lines)
    # A lung-region score's heat lies in the lungs by construction, and the summary must not sell that:
    # the lung share is then 1, and the check measures the unmasked error's share instead.
    assert isinstance(loc["lungs_only"], bool)
    assert any("by construction" in line for line in lines) == (loc["lungs_only"] and bool(loc["chance"]))
    if loc["lungs_only"]:
        assert loc["share_abnormal"] == pytest.approx(1.0) and loc["share_normal"] == pytest.approx(1.0)
        assert 0.0 < loc["unmasked_abnormal"] < 1.0 and 0.0 < loc["unmasked_normal"] < 1.0
    else:
        assert loc["unmasked_abnormal"] is None
    html = (out / "report.html").read_text()
    assert "Patient split and shift-aware split, side by side" in html and "Does the threshold hold" in html
    for fig in ("heatmaps.png", "heatmaps_shift.png", "roc_shift.png"):
        assert (out / "pictures" / fig).exists(), fig


def test_without_batches_or_orders_there_is_no_shift_split_and_the_note_says_why(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    cfg = _cfg(shift=ShiftSplitConfig(batch_regex=None, order_regex=None))
    data, _ = load_dataset(
        root, store_version=None, ingest_cfg=cfg.ingest, workers=1, cache_dir=None, shift=cfg.shift
    )
    ed = prepare(data, "normal", cfg, "none")
    assert ed.shift is None and "no file name matched" in ed.shift_note
    off = prepare(data, "normal", _cfg(shift=ShiftSplitConfig(enabled=False)), "none")
    assert off.shift is None and "off" in off.shift_note


def test_without_a_named_batch_the_split_holds_out_the_earliest_block_only(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    cfg = _cfg(shift=ShiftSplitConfig(batch_regex=None))
    data, _ = load_dataset(
        root, store_version=None, ingest_cfg=cfg.ingest, workers=1, cache_dir=None, shift=cfg.shift
    )
    ed = prepare(data, "normal", cfg, "none")
    assert ed.shift is not None and ed.shift.held_out == () and "no batch to hold out" in ed.shift_note
    assert len(ed.shift.new_normals) == 0 and ed.shift.local_count == 0
    local, unseen = ed.shift.draw(0)
    assert len(local) == len(unseen) == 0
