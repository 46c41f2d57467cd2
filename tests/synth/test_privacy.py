"""The privacy filter."""

from __future__ import annotations

import numpy as np
import pytest

from medvae.synth.privacy import nearest_neighbour_distances, privacy_filter, privacy_threshold

SIZE = 16


def _images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def _bruteforce_nn(q: np.ndarray, r: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    qf = q.reshape(len(q), -1).astype(np.float64) / 255
    rf = r.reshape(len(r), -1).astype(np.float64) / 255
    out = []
    for i, a in enumerate(qf):
        d = [np.sqrt(np.mean((a - b) ** 2)) for j, b in enumerate(rf) if not (exclude_self and i == j)]
        out.append(min(d))
    return np.array(out)


def test_nearest_neighbour_distances_match_bruteforce() -> None:
    q, r = _images(7, seed=1, size=5), _images(11, seed=2, size=5)
    np.testing.assert_allclose(nearest_neighbour_distances(q, r, chunk=3), _bruteforce_nn(q, r), atol=1e-9)
    same = np.concatenate([r, r[:1]])  # index 11 duplicates index 0: only the self-match is excluded
    d = nearest_neighbour_distances(same, same, exclude_self=True, chunk=4)
    np.testing.assert_allclose(d, _bruteforce_nn(same, same, exclude_self=True), atol=1e-9)
    assert d[0] == 0.0 and d[11] == 0.0 and np.all(d[1:11] > 0)
    assert np.all(nearest_neighbour_distances(same, same) == 0.0)
    with pytest.raises(ValueError):
        nearest_neighbour_distances(q, r, exclude_self=True)


def test_privacy_filter_rejects_planted_copies() -> None:
    rng = np.random.default_rng(0)
    train = _images(200, seed=3)
    threshold = privacy_threshold(train, 0.01)
    assert threshold > 0
    # Far samples: binary 0/255 noise, much further from uniform noise than train images are from each other.
    far = (rng.integers(0, 2, size=(20, SIZE, SIZE)) * 255).astype(np.uint8)
    exact = train[17:18]
    noisy = np.clip(train[42:43].astype(int) + rng.integers(-3, 4, size=(1, SIZE, SIZE)), 0, 255).astype(
        np.uint8
    )
    samples = np.concatenate([far, exact, noisy])
    res = privacy_filter(samples, train, threshold)
    assert res.keep[:20].all()
    assert not res.keep[20] and not res.keep[21]
    assert res.distances[20] == 0.0 and res.distances[21] < threshold
    assert res.rejection_rate == pytest.approx(2 / 22)
    # A zero threshold still never releases an exact copy.
    assert not privacy_filter(exact, train, 0.0).keep[0]


def test_privacy_threshold_subsamples_and_ignores_duplicates() -> None:
    train = _images(60, seed=4)
    full = privacy_threshold(train, 0.5)
    sub = privacy_threshold(train, 0.5, max_reference=20, seed=1)
    assert sub == privacy_threshold(train, 0.5, max_reference=20, seed=1)
    assert sub >= full * 0.9  # a sparser subsample can only spread images out (up to sampling noise)
    dup = np.concatenate([train, train[:10]])
    assert privacy_threshold(dup, 0.0) > 0.0
    with pytest.raises(ValueError):
        privacy_threshold(train[:1], 0.5)
