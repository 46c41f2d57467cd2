"""Generation figures (FD, k-NN precision/recall, label fidelity) and the utility study's synthetic draws."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from medvae.eval.generation import frechet_distance, knn_precision_recall, label_fidelity
from medvae.eval.utility import Drawn, _draw_kept, _repeated, _train_sets, summarise_utility
from medvae.synth.sample import Sampling


def _eig_fd(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr)


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a + 2.0, a) == pytest.approx(6 * 4.0, rel=1e-6)  # same covariance
    b = rng.normal(scale=2.0, size=(300, 6))
    assert frechet_distance(a, b) == pytest.approx(_eig_fd(a, b), rel=1e-6)


def test_knn_precision_and_recall_tell_a_collapsed_generator_from_a_far_one() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 2))
    assert knn_precision_recall(real, real.copy()) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 50.0) == (0.0, 0.0)
    # Mode collapse: every sample inside one small region of the real data is precise but covers little.
    collapsed = real[np.argsort(np.linalg.norm(real, axis=1))[:30]] * 0.5
    precision, recall = knn_precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.3
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(real, real[:3])


def test_label_fidelity_is_the_auroc_against_the_intended_label() -> None:
    intended = np.array([0, 0, 1, 1])
    assert label_fidelity(np.array([0.1, 0.2, 0.8, 0.9]), intended) == 1.0
    assert label_fidelity(np.array([0.9, 0.8, 0.2, 0.1]), intended) == 0.0
    assert label_fidelity(np.array([0.5, 0.5]), np.array([1, 1])) is None


def test_repeated_real_images_reach_the_size_asked_for() -> None:
    x, y = np.arange(5)[:, None, None] * np.ones((5, 2, 2)), np.arange(5) % 2
    xr, yr = _repeated(x, y, 12, seed=0)
    assert len(xr) == len(yr) == 12
    counts = np.bincount(xr[:, 0, 0].astype(int), minlength=5)
    assert counts.min() == 2 and counts.max() == 3  # twice each, then 2 more, none thrice twice
    assert np.array_equal(yr, xr[:, 0, 0].astype(int) % 2)


def test_draws_continue_until_the_filter_kept_enough_and_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_sample(
        gen: Any, n: int, *, label_index: int, seed: int, sampler: Any = None, detail: Any = None
    ) -> np.ndarray:
        calls.append(n)
        return np.full((n, 2, 2), seed % 256, dtype=np.uint8)

    def keep_every_fourth(xs: np.ndarray, train: np.ndarray, thr: float) -> Any:
        keep = np.arange(len(xs)) % 4 == 0
        return SimpleNamespace(keep=keep, distances=np.full(len(xs), 0.5))

    monkeypatch.setattr("medvae.synth.sample.sample_images", fake_sample)
    monkeypatch.setattr("medvae.synth.privacy.privacy_filter", keep_every_fourth)
    drawn = _draw_kept(
        None, {0: 10, 1: 4}, np.zeros((3, 2, 2), np.uint8), 0.1, seed=0, max_draws=8.0, how=Sampling()
    )
    for c, n in ((0, 10), (1, 4)):
        assert int((drawn.keep & (drawn.labels == c)).sum()) >= n
        assert int((drawn.labels == c).sum()) <= 8 * n
    assert len(calls) > 2  # one round of the requested size would have kept a quarter
    # A cap of 2x the request cannot reach 10 kept at a keep rate of 1/4: the shortfall stays visible.
    capped = _draw_kept(
        None, {0: 10}, np.zeros((3, 2, 2), np.uint8), 0.1, seed=0, max_draws=2.0, how=Sampling()
    )
    assert len(capped.labels) == 20 and int(capped.keep.sum()) == 6  # rounds of 10: 3 kept each


def test_smaller_shares_are_prefixes_of_the_larger_ones() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    images = np.arange(8, dtype=np.uint8)[:, None, None] * np.ones((8, 1, 1), np.uint8)
    keep = np.array([True, True, False, True, True, True, True, False])
    d = Drawn(images, labels, keep, np.zeros(8), {0: 4, 1: 4})
    x1, y1 = d.kept(1.0, {0: 2, 1: 2})
    x2, y2 = d.kept(2.0, {0: 2, 1: 2})
    assert x1[:, 0, 0].tolist() == [0, 4, 1, 3] and y1.tolist() == [0, 0, 1, 1]
    assert x2[:, 0, 0].tolist() == [0, 4, 6, 1, 3, 5]  # class 0 has 3 kept, class 1 has 3: the shortfall
    assert y2.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_class_with_nothing_to_draw_gives_an_empty_share(monkeypatch: pytest.MonkeyPatch) -> None:
    def ones(g: Any, n: int, *, label_index: int, seed: int, sampler: Any, detail: Any) -> np.ndarray:
        return np.ones((n, 2, 2), np.uint8)

    monkeypatch.setattr("medvae.synth.sample.sample_images", ones)
    monkeypatch.setattr(
        "medvae.synth.privacy.privacy_filter",
        lambda xs, tr, thr: SimpleNamespace(keep=np.ones(len(xs), bool), distances=np.ones(len(xs))),
    )
    drawn = _draw_kept(
        None, {0: 0, 1: 3}, np.zeros((3, 2, 2), np.uint8), 0.1, seed=0, max_draws=2.0, how=Sampling()
    )
    assert drawn.images.shape == (3, 2, 2) and drawn.labels.tolist() == [1, 1, 1]
    none = _draw_kept(
        None, {0: 0, 1: 0}, np.zeros((3, 2, 2), np.uint8), 0.1, seed=0, max_draws=2.0, how=Sampling()
    )
    assert none.images.shape == (0, 2, 2) and len(none.keep) == 0


def test_every_share_gets_real_plus_synthetic_and_synthetic_only_sets() -> None:
    labels = np.array([0, 1] * 4)
    images = np.arange(8, dtype=np.uint8)[:, None, None] * np.ones((8, 1, 1), np.uint8)
    d = Drawn(images, labels, np.ones(8, bool), np.zeros(8), {0: 4, 1: 4})
    x_tr, y_tr = np.full((4, 1, 1), 100, np.uint8), np.array([0, 0, 1, 1])
    sets = _train_sets(x_tr, y_tr, d, (0.5, 1.0, 2.0), 2.0, seed=0)
    assert set(sets) == {
        "real",
        "real_synthetic",
        "synthetic",
        "real_repeated",
        "real_synthetic@0.5",
        "synthetic@0.5",
        "real_synthetic@1",
        "synthetic@1",
    }
    sizes = {k: len(v[1]) for k, v in sets.items()}
    assert (sizes["synthetic"], sizes["synthetic@1"], sizes["synthetic@0.5"]) == (8, 4, 2)
    assert sizes["real_synthetic@1"] == 8 and sizes["real_repeated"] == sizes["real_synthetic"] == 12
    # The same-size synthetic set holds synthetic images only, both labels, as many as the real ones.
    xs, ys = sets["synthetic@1"]
    assert int(xs.max()) < 100 and sorted(ys.tolist()) == [0, 0, 1, 1]


def test_the_summary_gives_tstr_at_every_share() -> None:
    def run(seed: int, real: float, syn: float, syn1: float) -> Any:
        auroc = {
            "real": real,
            "real_synthetic": 0.99,
            "synthetic": syn,
            "real_repeated": 0.99,
            "synthetic@1": syn1,
        }
        fr = SimpleNamespace(auroc=auroc, generation={}, privacy={k: 0.0 for k in PRIVACY})
        return SimpleNamespace(seed=seed, fractions={"0.1": fr})

    from medvae.eval.utility import PRIVACY_FIGURES as PRIVACY

    u, _ = summarise_utility([run(0, 0.8, 0.76, 0.72), run(1, 1.0, 0.9, 0.8)])
    assert u["0.1"]["tstr_ratio"]["mean"] == pytest.approx((0.95 + 0.9) / 2)
    assert u["0.1"]["tstr_ratio@1"]["mean"] == pytest.approx((0.9 + 0.8) / 2)
