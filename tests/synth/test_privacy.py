"""The privacy filter: plain and shift/flip-tolerant distances, the robust threshold, planted copies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medvae.synth.privacy import (
    MIN_THRESHOLD,
    PLANT_KINDS,
    catch_rate,
    jpeg_reencode,
    nearest_neighbour_distances,
    plant_copies,
    privacy_filter,
    privacy_threshold,
    shifted,
    threshold_report,
    tolerant_nearest,
)
from tests.synth.helpers import noise_images

KERMANY = (
    Path(os.environ.get("MEDVAE_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "data"
    / "kermany_train"
)


def _smooth(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    # Distinct smooth "scans": random Gaussian blobs on a gradient, with mild texture. Far apart from
    # one another (RMS > 0.1), yet JPEG-friendly like real radiographs.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), dtype=np.uint8)
    for k in range(n):
        img = rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx
        for _ in range(6):
            cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            img = img + rng.uniform(-2, 2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        # Structure at a few pixels' scale (like ribs and vessels), so that a shift changes the image.
        tex = np.kron(rng.normal(0, 1, (size // 4, size // 4)), np.ones((4, 4)))
        tex = (tex + np.roll(tex, 1, 0) + np.roll(tex, 1, 1) + np.roll(tex, (1, 1), (0, 1))) / 4
        img = (img - img.min()) / (np.ptp(img) + 1e-9) * 160 + 25 * tex + 40 + rng.normal(0, 3, img.shape)
        out[k] = np.clip(img, 0, 255)
    return out


def _bruteforce_nn(q: np.ndarray, r: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    qf = q.reshape(len(q), -1).astype(np.float64) / 255
    rf = r.reshape(len(r), -1).astype(np.float64) / 255
    out = []
    for i, a in enumerate(qf):
        d = [np.sqrt(np.mean((a - b) ** 2)) for j, b in enumerate(rf) if not (exclude_self and i == j)]
        out.append(min(d))
    return np.array(out)


def _bruteforce_tolerant(q: np.ndarray, r: np.ndarray, s: int, exclude_self: bool = False) -> np.ndarray:
    h, w = q.shape[1] - 2 * s, q.shape[2] - 2 * s
    out = np.full(len(q), np.inf)
    for i, a in enumerate(q.astype(np.int64)):
        crop = a[s : s + h, s : s + w]
        for j, b in enumerate(r.astype(np.int64)):
            if exclude_self and i == j:
                continue
            for bb in (b, b[:, ::-1]):
                for oy in range(2 * s + 1):
                    for ox in range(2 * s + 1):
                        out[i] = min(out[i], float(((crop - bb[oy : oy + h, ox : ox + w]) ** 2).sum()))
    return np.sqrt(out / (h * w)) / 255


def test_nearest_neighbour_distances_match_bruteforce() -> None:
    q, r = noise_images(7, seed=1, size=5), noise_images(11, seed=2, size=5)
    np.testing.assert_allclose(nearest_neighbour_distances(q, r, chunk=3), _bruteforce_nn(q, r), atol=1e-9)
    same = np.concatenate([r, r[:1]])  # index 11 duplicates index 0: only the self-match is excluded
    d = nearest_neighbour_distances(same, same, exclude_self=True, chunk=4)
    np.testing.assert_allclose(d, _bruteforce_nn(same, same, exclude_self=True), atol=1e-9)
    assert d[0] == 0.0 and d[11] == 0.0 and np.all(d[1:11] > 0)
    with pytest.raises(ValueError):
        nearest_neighbour_distances(q, r, exclude_self=True)


@pytest.mark.parametrize(("kind", "block"), [("noise", 1024), ("smooth", 1024), ("smooth", 2), ("noise", 1)])
def test_tolerant_nearest_is_exact(kind: str, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import medvae.synth.privacy as mod

    monkeypatch.setattr(mod, "_REF_BLOCK", block)  # references split into blocks give the same answer
    if kind == "noise":
        q, r = noise_images(5, seed=1, size=12), noise_images(8, seed=2, size=12)
    else:
        imgs = _smooth(14, seed=3, size=12)
        q, r = imgs[:5], imgs[5:]
    want = _bruteforce_tolerant(q, r, 2)
    got = tolerant_nearest(q, r, max_shift=2)
    np.testing.assert_allclose(got.distances, want, rtol=1e-12, atol=1e-12)
    cap = float(np.median(want))
    capped = tolerant_nearest(q, r, max_shift=2, cap=cap).distances
    below = want < cap
    np.testing.assert_allclose(capped[below], want[below], rtol=1e-12)
    assert np.all(capped[~below] >= want[~below] - 1e-12) and np.all(capped[~below] >= cap - 1e-12)
    self_d = tolerant_nearest(r, r, max_shift=2, exclude_self=True).distances
    np.testing.assert_allclose(self_d, _bruteforce_tolerant(r, r, 2, exclude_self=True), rtol=1e-12)


def test_tolerant_nearest_finds_shifted_and_flipped_copies() -> None:
    train = _smooth(40, seed=4)
    q = np.stack([train[7], shifted(train[8], 3, -4), train[9][:, ::-1], shifted(train[10][:, ::-1], -4, 1)])
    res = tolerant_nearest(q, train, cap=0.05)
    assert res.distances.tolist() == [0.0, 0.0, 0.0, 0.0]  # exact on the uint8 scale
    assert res.index.tolist() == [7, 8, 9, 10]
    assert res.flipped.tolist() == [False, False, True, True]
    assert res.shift.tolist() == [[0, 0], [3, -4], [0, 0], [-4, 1]]
    # A plain distance does not see them: a shifted copy is far in plain RMS.
    assert nearest_neighbour_distances(q[1:2], train)[0] > 0.03
    with pytest.raises(ValueError):
        tolerant_nearest(q.astype(np.float32), train)
    with pytest.raises(ValueError):
        tolerant_nearest(q, train, max_shift=16)


def test_threshold_is_robust_to_near_duplicates() -> None:
    train = _smooth(150, seed=5)
    clean = threshold_report(train, 0.01, floor=0.0)
    assert clean.near_duplicates == 0 and clean.threshold > 0.05
    dirty = np.concatenate([train, np.stack([jpeg_reencode(train[k], 85) for k in range(3)])])
    assert nearest_neighbour_distances(dirty[-1:], train)[0] < 0.03  # the re-encode is a near-duplicate
    rep = threshold_report(dirty, 0.01, floor=0.0)
    assert rep.near_duplicates == 6  # both members of each pair
    assert rep.threshold == pytest.approx(clean.threshold, rel=0.1)
    # Without the duplicate rule the quantile collapses; the floor still holds it up.
    assert privacy_threshold(dirty, 0.01, floor=0.0, duplicate_distance=0.0) < 0.5 * clean.threshold
    assert privacy_threshold(dirty, 0.01, duplicate_distance=0.0) == MIN_THRESHOLD
    sub = privacy_threshold(train, 0.5, max_reference=40, seed=1, floor=0.0)
    assert sub == privacy_threshold(train, 0.5, max_reference=40, seed=1, floor=0.0)
    assert sub >= privacy_threshold(train, 0.5, floor=0.0) * 0.9  # sparser: stricter (up to noise)
    with pytest.raises(ValueError):
        privacy_threshold(train[:1], 0.5)


def test_privacy_filter_rejects_planted_copies_keeps_far_samples() -> None:
    train = _smooth(120, seed=6)
    threshold = privacy_threshold(train, 0.01)
    far = _smooth(30, seed=99)  # other "patients"
    planted = plant_copies(train, 50, seed=2)
    res = privacy_filter(np.concatenate([far, planted.images]), train, threshold)
    assert not res.keep[30:].any()
    assert res.keep[:30].mean() >= 0.9
    assert res.rejection_rate == pytest.approx(1 - res.keep.mean())
    copies = res.nearest[30:] == planted.source
    assert copies.mean() >= 0.9  # the copy is traced to its source image
    # Zero thresholds still never release an exact copy (plain or shifted).
    exact = np.stack([train[3], shifted(train[4], 1, 1)])
    assert not privacy_filter(exact, train, 0.0, copy_threshold=0.0).keep.any()


@pytest.mark.parametrize("train_duplicates", [0, 10])
def test_catch_rate_all_planted_kinds(train_duplicates: int) -> None:
    train = _smooth(120, seed=7)
    rep = catch_rate(_smooth(20, seed=8), train, n_planted=60, train_duplicates=train_duplicates, seed=3)
    assert rep["caught"] == {**dict.fromkeys(PLANT_KINDS, 1.0), "all": 1.0}
    assert rep["false_negative_rate"] == 0.0
    assert rep["near_duplicates"] >= 2 * train_duplicates
    assert rep["threshold"] >= MIN_THRESHOLD
    assert rep["sample_rejection_rate"] <= 0.1


def _kermany(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from medvae.config import IngestConfig
    from medvae.data.deid import patient_from_name
    from medvae.data.prepare import prepare_file

    files = sorted(KERMANY.rglob("*.jpeg"))
    pick = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    cfg = IngestConfig()
    imgs = np.stack([prepare_file(files[k], cfg) for k in pick])
    groups = np.array([patient_from_name(files[k].name, cfg.patient_regex) or files[k].name for k in pick])
    return imgs, groups


@pytest.mark.slow
@pytest.mark.skipif(not KERMANY.is_dir(), reason="../shared/data/kermany_train is not here")
def test_kermany_planted_copies_caught_real_images_kept() -> None:
    imgs, groups = _kermany(900, seed=0)
    held_patients = np.unique(groups)[::4]
    held = np.isin(groups, held_patients)
    rep = catch_rate(imgs[held], imgs[~held], n_planted=250, train_duplicates=20, seed=1)
    assert rep["false_negative_rate"] == 0.0, rep
    assert rep["sample_rejection_rate"] <= 0.05, rep  # distinct patients' real images are mostly kept
