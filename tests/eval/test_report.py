"""Tests for the evaluation's metrics assembly, targets, warnings, galleries, figures and HTML report.

They build anomaly runs from crafted scores (no training), so every expected figure is known exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medvae.config import EvaluateConfig, Target
from medvae.eval import plots
from medvae.eval.anomaly import AnomalyRun
from medvae.eval.data import EvalData, EvalSplit, LabelledImages
from medvae.eval.report import Figure, render_report
from medvae.eval.scores import REGISTRY
from medvae.eval.study import build_metrics, make_figures, summary_lines
from medvae.eval.targets import check_targets

# Test split: 6 normals, then 6 abnormals. Positions 0..11 in the data; 12..15 are train/val.
_Y = np.array([0] * 6 + [1] * 6)
_GOOD = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 4.5, 6.0, 7.0, 8.0, 10.0, 11.0])  # AUROC 31/36


def _data() -> EvalData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8), dtype=np.uint8)
    labels = np.array(["normal"] * 6 + ["pneumonia"] * 6 + ["normal"] * 4)
    names = [f"{lbl}/img{i}.png" for i, lbl in enumerate(labels)]
    names[5] = "normal/<script>alert(1)</script>.png"  # file names are data: they must be escaped
    src = LabelledImages(images, labels, np.array([f"p{i}" for i in range(16)]), np.array(names))
    assignment = np.array(["test"] * 12 + ["train"] * 2 + ["val"] * 2)
    split = EvalSplit(
        train_normal=np.array([12, 13]),
        val_normal=np.array([14, 15]),
        test=np.arange(12),
        test_y=_Y,
        train_all=np.array([12, 13]),
        val_all=np.array([14, 15]),
    )
    y01 = (labels != "normal").astype(np.int64)
    intensity = {"at_ingest": "none", "applied_here": "none"}
    return EvalData(images, y01, src.groups, src, assignment, split, intensity)


def _run(seed: int, primary_scores: np.ndarray, threshold: float = 8.5) -> AnomalyRun:
    scores = {k: _GOOD.copy() for k in REGISTRY}
    scores["mahalanobis"] = primary_scores
    scores["kl"] = -_GOOD  # runs backwards: AUROC 2/36
    val = {k: np.array([1.0, 2.0]) for k in REGISTRY}
    return AnomalyRun(
        seed=seed,
        primary="mahalanobis",
        threshold=threshold,
        target_fpr=0.05,
        test_index=np.arange(12),
        y=_Y,
        scores=scores,
        val_scores=val,
        percentile=np.linspace(0, 100, 12),
        auroc_ci={k: (0.5, 1.0) for k in REGISTRY},
        fidelity={"ssim": 0.5, "psnr": 20.0, "n": 6},
        training={
            "best_epoch": 0,
            "epochs_run": 1,
            "stopped_early": False,
            "device": "cpu",
            "train_seconds": 1,
        },
        n_train_normal=2,
    )


def _metrics(cfg: EvaluateConfig | None = None) -> tuple[dict, list[AnomalyRun], EvalData]:
    cfg = cfg or EvaluateConfig(gallery=3)
    ed = _data()
    runs = [_run(0, _GOOD), _run(1, _GOOD + 0.1)]
    run = {"source": "/data", "normal_label": "normal", "device": "cpu"}
    m = build_metrics(
        ed, cfg, runs, [], run=run, info={"kind": "folder", "rejected": [("bad.png", "truncated")]}
    )
    m["timing"] = {"total_seconds": 1.0}
    return m, runs, ed


def test_operating_point_figures_at_the_calibrated_threshold() -> None:
    m, _, _ = _metrics()
    r = m["anomaly"]["per_seed"][0]
    # Threshold 8.5 flags the normal scoring 9 and the abnormals scoring 10 and 11.
    assert r["confusion"] == {"tn": 5, "fp": 1, "fn": 4, "tp": 2}
    assert r["test_fpr"]["value"] == pytest.approx(1 / 6) and r["test_fpr"]["target"] == 0.05
    lo, hi = r["test_fpr"]["ci95"]
    assert lo < 1 / 6 < hi and hi < 0.65
    assert r["sensitivity"] == pytest.approx(2 / 6) and r["specificity"] == pytest.approx(5 / 6)
    assert r["scores"]["mahalanobis"]["auroc"] == pytest.approx(31 / 36)
    # The reason, not the file name: names below the source root may be patient names.
    assert m["data"]["rejected"] == [{"name": "rejected file 1", "reason": "truncated"}]


def test_gallery_holds_the_worst_false_positives_and_the_lowest_abnormals() -> None:
    m, _, _ = _metrics()
    g = m["anomaly"]["gallery"]
    assert [t["score"] for t in g["false_positives"]] == [9.0, 5.0, 4.0]
    assert [t["flagged"] for t in g["false_positives"]] == [True, False, False]
    assert [t["score"] for t in g["missed"]] == [4.5, 6.0, 7.0]
    assert all(t["label"] == "pneumonia" and not t["flagged"] for t in g["missed"])
    assert g["false_positives"][0]["name"].endswith("</script>.png")
    assert g["missed"][0]["percentile"] == pytest.approx(100 * 6 / 11)


def test_a_backwards_score_is_a_warning_in_metrics_summary_and_report(tmp_path: Path) -> None:
    m, runs, ed = _metrics()
    assert len(m["warnings"]) == 1 and "kl" in m["warnings"][0] and "seeds [0, 1]" in m["warnings"][0]
    lines = summary_lines(m)
    assert lines[0].startswith("WARNING: anomaly score kl")
    html = render_report(m, make_figures(ed, runs, [], m, tmp_path))
    assert 'class="banner"' in html and "runs backwards" in html
    # Without a backwards score there is no banner.
    for r in runs:
        r.scores["kl"] = _GOOD
    m2 = build_metrics(
        ed,
        EvaluateConfig(),
        runs,
        [],
        run={"source": "s", "normal_label": "normal", "device": "cpu"},
        info={},
    )
    m2["timing"] = {"total_seconds": 1.0}
    assert m2["warnings"] == [] and 'class="banner"' not in render_report(m2, {})


def test_report_embeds_every_figure_and_escapes_file_names(tmp_path: Path) -> None:
    m, runs, ed = _metrics()
    figs = make_figures(ed, runs, [], m, tmp_path)
    for role in ("roc", "pr", "confusion", "score_hist", "gallery_fp", "gallery_missed"):
        assert figs[role].path.exists(), role
    html = render_report(m, figs)
    assert html.count("data:image/png;base64,") == 6  # the model grids were never written: left out
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html
    assert "Clopper-Pearson" in html and "16.7% (1/6)" in html
    assert re.search(r"mahalanobis \(primary\)</td>\s*<td[^>]*>0\.861", html)
    # The one figure no template slot knows still appears.
    extra = Figure(figs["roc"].path, "an extra figure")
    assert "an extra figure" in render_report(m, {**figs, "something_new": extra})


def test_targets_come_from_the_config_not_the_code() -> None:
    m, _, _ = _metrics()
    rows = {t["target"]: t for t in m["targets"]}
    primary = rows["primary score AUROC >= 0.85 (mahalanobis)"]
    assert primary["met"] is True and primary["observed"] == pytest.approx(31 / 36)
    assert all("utility" not in t["metric"] for t in m["targets"])  # the utility study did not run
    strict = EvaluateConfig(
        targets=(Target(metric="anomaly.summary.scores.{primary_score}.auroc.mean", value=0.99),)
    )
    (row,) = check_targets(strict.targets, m)
    assert row["met"] is False and row["required"] == 0.99
    assert row["target"] == "anomaly.summary.scores.mahalanobis.auroc.mean >= 0.99"  # the default name


def test_target_paths_expand_wildcards_dotted_keys_and_references() -> None:
    metrics = {
        "anomaly": {"summary": {"primary_score": "kl"}},
        "utility": {
            "summary": {
                "1": {"a": {"mean": 0.8}, "b": {"mean": 0.9}},
                "0.1": {"a": {"mean": 0.5}, "b": {"mean": None}},
            }
        },
    }
    t = Target(
        name="a vs b at {fraction}",
        metric="utility.summary.*.a.mean",
        value=0.85,
        relative_to="utility.summary.*.b.mean",
    )
    rows = check_targets([t], metrics)
    assert [(r["target"], r["metric"], r["met"]) for r in rows] == [
        ("a vs b at 100%", "utility.summary.1.a.mean", True),  # 0.8 >= 0.85 * 0.9
        ("a vs b at 10%", "utility.summary.0.1.a.mean", None),  # the reference is missing: n/a
    ]
    (low,) = check_targets(
        [Target(metric="utility.summary.{min_fraction}.a.mean", op="<", value=0.6)], metrics
    )
    assert low["metric"] == "utility.summary.0.1.a.mean" and low["met"] is True
    assert check_targets([Target(metric="privacy.summary.*.x", value=0)], metrics) == []  # not run
    with pytest.raises(ValueError, match="placeholder"):
        Target(name="at {fracton}", metric="a.b", value=1)


def test_utility_axis_shows_a_bar_far_below_chance() -> None:
    s = {"mean": 0.237, "sd": 0.01}
    fig = plots.utility_figure(
        {"1": {"real": s, "real_synthetic": s, "synthetic": {"mean": None, "sd": None}}}
    )
    ax = fig.axes[0]
    assert ax.get_ylim()[0] <= 0.0 and ax.get_ylim()[1] >= 1.0
    assert {t.get_text() for t in ax.texts} >= {"0.237", "n/a"}
    plots._pyplot().close(fig)


def _shift_run(new_fpr: tuple[int, int], recal_fpr: tuple[int, int]) -> AnomalyRun:
    from dataclasses import replace

    from medvae.eval.cohort import CohortCheck
    from medvae.eval.localisation import LocalisationCheck
    from medvae.eval.metrics import proportion

    cohort = CohortCheck(
        held_out=("NORMAL2",),
        fpr_by_batch={"(default batch)": proportion(0, 2), "NORMAL2": proportion(*new_fpr)},
        new_cohort_fpr=proportion(*new_fpr),
        local_normals=300,
        recalibrated_threshold=9.5,
        recalibrated_fpr=proportion(*recal_fpr),
        draws=3,
        recalibrated_fpr_draws=(recal_fpr[0] / recal_fpr[1], 0.04, 0.06),
        recalibrated_sensitivity=0.8,
    )
    loc = LocalisationCheck(6, 6, 0.25, 0.35, 0.22, 0.9)
    heat = (np.arange(12), np.random.default_rng(0).random((12, 8, 8)).astype(np.float32))
    return replace(_run(0, _GOOD), split_name="shift", cohort=cohort, localisation=loc, heat=heat)


def test_the_shift_split_sits_beside_the_patient_split_with_its_fpr_targets(tmp_path: Path) -> None:
    ed = _data()
    runs = [_run(0, _GOOD)]
    run = {"source": "/data", "normal_label": "normal", "device": "cpu"}
    shift = [_shift_run(new_fpr=(90, 744), recal_fpr=(22, 444))]
    ed.shift_note = "held out whole: batch NORMAL2"
    ed.shift = type("S", (), {"assignment": ed.assignment})()  # only its assignment is read
    m = build_metrics(ed, EvaluateConfig(), runs, [], run=run, info={}, shift=shift)
    m["timing"] = {"total_seconds": 1.0}
    co = m["shift"]["cohort"]
    assert co["new_cohort_fpr"]["mean"] == pytest.approx(90 / 744)
    assert co["recalibrated_fpr"]["mean"] == pytest.approx((22 / 444 + 0.04 + 0.06) / 3)  # over draws
    rows = {t["target"]: t for t in m["targets"]}
    assert rows["stored threshold on the new cohort's normals: FPR <= 1.4 x target"]["met"] is False
    assert rows["threshold recalibrated on the new cohort's normals: FPR <= 1.4 x target"]["met"] is True
    assert rows["threshold recalibrated on the new cohort's normals: FPR <= 1.4 x target"]["required"] == (
        pytest.approx(0.07)
    )
    figs = make_figures(ed, runs, [], m, tmp_path, shift=shift)
    assert figs["heatmaps_shift"].path.exists() and figs["roc_shift"].path.exists()
    html = render_report(m, figs)
    assert "12.1% (90/744)" in html and "5.0% (22/444)" in html and "NORMAL2" in html
    assert re.search(r'class="bad">12\.1% \(90/744\)', html)  # the stored threshold fails: marked
    lines = summary_lines(m)
    assert any("stored 12.1%; recalibrated on 300 of its normals 5.0%" in line for line in lines)
    assert any("0.350 of the heat in the lungs for abnormals (1.40x chance 0.250)" in line for line in lines)
    assert not any("by construction" in line for line in lines) and "counts only the lung fields" not in html
    assert "(the mask)" not in html and "<td>1.40</td>" in html
    # A score that counts only the lungs puts its heat there by construction: report and summary say so,
    # and quote the unmasked error's lung shares instead.
    m["shift"]["localisation"].update(lungs_only=True, unmasked_abnormal=0.3012, unmasked_normal=0.2071)
    html = render_report(m, figs)
    assert "counts only the lung fields" in html and "unmasked error: lung share, abnormal" in html
    assert "<td>0.301</td><td>0.207</td>" in html
    assert "<td>(the mask)</td>" in html  # the share over chance restates the mask
    lines = summary_lines(m)
    assert any(
        "so its heat lies there by construction; the same error over the whole image puts 0.301 of its heat "
        "in the lungs for abnormals, 0.207 for normals (chance 0.250; 6+6 images)" in line
        for line in lines
    )
    assert not any("shift-aware split: 0.350 of the heat" in line for line in lines)


def test_without_a_shift_split_the_report_says_why() -> None:
    m, _, _ = _metrics()
    assert "shift" not in m
    m["shift_unavailable"] = "a store keeps no file names"
    assert "No shift-aware split (a store keeps no file names)" in render_report(m, {})


def test_a_shift_split_without_a_held_out_batch_says_the_threshold_was_not_checked(tmp_path: Path) -> None:
    from dataclasses import replace

    from medvae.eval.cohort import CohortCheck
    from medvae.eval.metrics import proportion

    ed = _data()
    ed.shift_note = "no batch to hold out whole"
    ed.shift = type("S", (), {"assignment": ed.assignment})()
    empty = CohortCheck(
        (), {"(default batch)": proportion(1, 6)}, proportion(0, 0), 0, None, proportion(0, 0)
    )
    shift = [replace(_run(0, _GOOD), split_name="shift", cohort=empty)]
    run = {"source": "/data", "normal_label": "normal", "device": "cpu"}
    m = build_metrics(ed, EvaluateConfig(), [_run(0, _GOOD)], [], run=run, info={}, shift=shift)
    m["timing"] = {"total_seconds": 1.0}
    assert (
        "threshold on a new cohort: not checked (the shift-aware split holds out no batch)"
        in summary_lines(m)
    )
    assert "Not checked: this shift-aware split holds out no acquisition batch" in render_report(m, {})
    rows = {t["target"]: t["met"] for t in m["targets"]}
    assert rows["stored threshold on the new cohort's normals: FPR <= 1.4 x target"] is None  # n/a


def test_the_sharpness_matched_auroc_sits_beside_each_split(tmp_path: Path) -> None:
    from dataclasses import replace

    from medvae.eval.confounds import SharpnessCheck

    ed = _data()
    ed.shift_note = "held out whole: batch NORMAL2"
    ed.shift = type("S", (), {"assignment": ed.assignment})()
    patient = [replace(_run(s, _GOOD), sharpness=SharpnessCheck(0.8, 0.9 + s / 100, 10)) for s in (0, 1)]
    shift = [replace(_shift_run((90, 744), (22, 444)), sharpness=SharpnessCheck(0.83, 0.88, 10))]
    run = {"source": "/data", "normal_label": "normal", "device": "cpu"}
    m = build_metrics(ed, EvaluateConfig(), patient, [], run=run, info={}, shift=shift)
    m["timing"] = {"total_seconds": 1.0}
    expected = {"alone_auroc": 0.8, "matched_auroc": 0.91, "strata": 10}
    assert m["anomaly"]["per_seed"][1]["sharpness"] == expected
    assert m["anomaly"]["summary"]["sharpness_matched_auroc"]["mean"] == pytest.approx(0.905)
    assert (
        "mahalanobis AUROC among test images of equal sharpness: patient split 0.905 ± 0.007 (sharpness "
        "alone 0.800 ± 0.000) | shift-aware split 0.880 ± 0.000 (sharpness alone 0.830 ± 0.000)"
    ) in summary_lines(m)
    html = render_report(m, {})
    assert "Does the ranking rest on image sharpness?" in html and "(10 quantile" in html
    assert "0.905 ± 0.007" in html and "0.880 ± 0.000" in html
    # A metrics.json from before the check has no such figure, and no line for it.
    del m["anomaly"]["summary"]["sharpness_matched_auroc"]
    assert not any("equal sharpness" in line for line in summary_lines(m))
