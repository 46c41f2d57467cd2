"""Tests for the sharpness shortcut check: the image statistic, the matched AUROC and the per-run check."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvae.eval.confounds import check_sharpness, sharpness, strata_for, stratified_auroc


def _checkerboard(n: int = 8) -> np.ndarray:
    return ((np.indices((n, n)).sum(0) % 2) * 255).astype(np.uint8)


def test_sharpness_is_zero_for_flat_one_for_a_checkerboard_and_falls_with_blur() -> None:
    board = _checkerboard()
    flat = np.full((8, 8), 128, np.uint8)
    soft = ((board.astype(np.float64) + np.roll(board, 1, axis=1) + np.roll(board, 1, axis=0)) / 3).round()
    got = sharpness(np.stack([flat, board, soft.astype(np.uint8)]))
    assert got[0] == 0.0 and got[1] == pytest.approx(1.0)
    assert 0.0 < got[2] < got[1]
    # uint8 and [0, 1] floats, with or without a channel axis, measure the same.
    assert sharpness(board[None, None].astype(np.float32) / 255.0)[0] == pytest.approx(1.0)


def _images_of_sharpness(levels: np.ndarray) -> np.ndarray:
    """One 16×16 image per level: a checkerboard of that contrast around mid-grey."""
    board = (np.indices((16, 16)).sum(0) % 2) * 2.0 - 1.0
    return np.clip(0.5 + levels[:, None, None] * board[None] / 2, 0, 1)


def test_a_score_that_is_only_bluntness_loses_its_ranking_once_sharpness_is_matched() -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = np.r_[np.zeros(n), np.ones(n)].astype(np.int64)
    # Abnormal images are blunter on average, with overlap, as Kermany's pneumonia films are.
    levels = np.clip(np.r_[rng.normal(0.6, 0.1, n), rng.normal(0.45, 0.1, n)], 0.05, 1.0)
    images = _images_of_sharpness(levels)
    shortcut = -sharpness(images) + rng.normal(0, 1e-4, 2 * n)
    finding = y * 1.0 + rng.normal(0, 1.0, 2 * n)  # informative and unrelated to sharpness
    plain = roc_auc_score(y, shortcut)
    assert plain > 0.8
    check = check_sharpness(y, shortcut, images)
    assert check.alone == pytest.approx(plain, abs=0.01)
    assert check.strata == 10 and check.matched is not None
    # Inside a decile little sharpness difference is left to rank by: most of the excess over chance goes.
    assert check.matched - 0.5 < 0.4 * (plain - 0.5)
    honest = check_sharpness(y, finding, images)
    assert honest.matched == pytest.approx(roc_auc_score(y, finding), abs=0.05)


def test_matched_auroc_is_none_when_no_stratum_holds_both_classes() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    cov = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # the covariate separates the classes exactly
    assert stratified_auroc(y, cov, cov, strata=2) is None
    assert stratified_auroc(y, cov, cov, strata=1) == 1.0


def test_small_test_sets_get_fewer_strata_and_one_class_gives_no_check() -> None:
    assert strata_for(20) == 1 and strata_for(160) == 3 and strata_for(5000) == 10
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    check = check_sharpness(np.zeros(6, np.int64), np.arange(6.0), images)
    assert check.alone is None and check.matched is None
