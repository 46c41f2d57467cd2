"""Tests for the fixed small CNN classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medvae.eval.classifier import SmallCNN, predict_proba, train_classifier


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Class 1 has a bright square somewhere in the left half; class 0 is noise only.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 64, 64)).astype(np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(y):
        r, c = rng.integers(8, 40), rng.integers(4, 20)
        x[i, r : r + 16, c : c + 16] = 220
    return x, y


def test_learns_a_separable_toy_problem() -> None:
    x, y = _toy(64, 0)
    xv, yv = _toy(32, 1)
    xt, yt = _toy(64, 2)
    model = train_classifier(x, y, xv, yv, seed=0, epochs=3, device="cpu")
    p = predict_proba(model, xt)
    assert p.shape == (64, 2)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert roc_auc_score(yt, p[:, 1]) > 0.9
    assert not model.training


def test_training_is_deterministic_for_a_seed() -> None:
    x, y = _toy(32, 0)
    xv, yv = _toy(16, 1)
    a = predict_proba(train_classifier(x, y, xv, yv, seed=3, epochs=1, device="cpu"), xv)
    b = predict_proba(train_classifier(x, y, xv, yv, seed=3, epochs=1, device="cpu"), xv)
    assert np.allclose(a, b)


def test_shapes_and_input_checks() -> None:
    m = SmallCNN(3)
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError):
        SmallCNN(1)
    x, y = _toy(8, 0)
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(x.astype(np.float32), y, x, y, seed=0, epochs=1)
    with pytest.raises(ValueError, match="length"):
        train_classifier(x, y[:4], x, y, seed=0, epochs=1)
