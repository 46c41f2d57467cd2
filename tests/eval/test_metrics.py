"""Tests for medvae.eval.metrics: curves, intervals, confusion counts and summaries."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvae.eval.metrics import (
    binary_metrics,
    bootstrap_auroc,
    clopper_pearson,
    confusion,
    finite,
    paired_differences,
    pr_points,
    proportion,
    roc_points,
    summarise,
)


def test_clopper_pearson_matches_closed_forms_and_tables() -> None:
    # k = 0 and k = n have closed forms: the one-sided bounds are (alpha/2) ** (1/n).
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    # 5 of 10: the textbook exact interval (0.1871, 0.8129).
    lo, hi = clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_proportion_reports_counts_and_interval() -> None:
    p = proportion(3, 60)
    assert p["value"] == pytest.approx(0.05) and (p["k"], p["n"]) == (3, 60)
    assert p["ci95"][0] < 0.05 < p["ci95"][1]
    assert proportion(0, 0) == {"value": None, "k": 0, "n": 0, "ci95": None}


def test_bootstrap_auroc_equals_sklearn_on_the_same_resamples() -> None:
    rng = np.random.default_rng(3)
    y = np.array([0] * 30 + [1] * 20)
    s = np.round(rng.normal(size=50) + y, 1)  # rounded: many ties, which average ranks must handle
    lo, hi = bootstrap_auroc(y, s, n_boot=40, seed=7) or (0.0, 0.0)
    # Redraw the same stratified resamples and score each with scikit-learn.
    again = np.random.default_rng(7)
    pos, neg = s[y == 1], s[y == 0]
    rp = pos[again.integers(0, 20, (40, 20))]
    rn = neg[again.integers(0, 30, (40, 30))]
    ref = [roc_auc_score([1] * 20 + [0] * 30, np.concatenate([a, b])) for a, b in zip(rp, rn, strict=True)]
    assert lo == pytest.approx(np.quantile(ref, 0.025)) and hi == pytest.approx(np.quantile(ref, 0.975))
    assert lo < roc_auc_score(y, s) < hi
    assert bootstrap_auroc(y, s, n_boot=0) is None
    assert bootstrap_auroc(y, y.astype(float), n_boot=20) == (1.0, 1.0)  # perfectly separated


def test_confusion_counts_each_cell() -> None:
    y = np.array([0, 0, 0, 1, 1])
    flagged = np.array([False, True, False, True, False])
    assert confusion(y, flagged) == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}


def test_curves_span_the_unit_square() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    roc = roc_points(y, s)
    assert roc.shape[0] == 2 and (roc[:, 0] == [0, 0]).all() and (roc[:, -1] == [1, 1]).all()
    pr = pr_points(y, s)
    assert pr[0].max() == 1.0 and pr[1].min() >= 0.5  # recall reaches 1; precision never below prevalence


def test_binary_metrics_survive_overflowing_scores() -> None:
    s = np.array([0.0, np.inf, np.nan, 5.0])
    assert np.isfinite(finite(s)).all()
    assert binary_metrics(np.array([0, 1, 0, 1]), s)["auroc"] == 1.0


def test_summaries_and_paired_differences() -> None:
    s = summarise([0.8, None, 1.0, float("nan"), 0.9])
    assert (s["n"], s["min"], s["max"]) == (3, 0.8, 1.0) and s["sd"] == pytest.approx(0.1)
    assert summarise([])["mean"] is None
    # Seed 1 has no value for b: the pair is dropped, not the seed of a alone.
    d = paired_differences([0.9, 0.7, 0.8], [0.8, None, 0.6])
    assert d["n"] == 2 and d["values"] == pytest.approx([0.1, 0.2]) and d["mean"] == pytest.approx(0.15)


def test_auroc_on_a_crafted_case() -> None:
    y = np.array([0, 0, 1, 1])
    # Of the 4 (abnormal, normal) pairs, 3 are ranked correctly: AUROC = 3/4.
    m = binary_metrics(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75)
    # Average precision: ranks 0.8 (tp), 0.4 (fp), 0.35 (tp) -> (1/1 + 2/3) / 2.
    assert m["auprc"] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0)
    assert binary_metrics(y, np.array([0.0, 0.1, 0.9, 1.0]))["auroc"] == 1.0
