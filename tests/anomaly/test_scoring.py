"""Tests for latent anomaly scores, calibration and heat maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medvae.anomaly.calibration import (
    Calibration,
    calibrate,
    calibration_warnings,
    cohort_warnings,
    flagged_share_warnings,
    percentile_among_normals,
    recalibrate,
    screen,
    site_shift_warnings,
    threshold_at_fpr,
    unlike_training,
)
from medvae.anomaly.heatmaps import (
    lowpass_maps,
    occlusion_maps,
    reconstruction_error_maps,
    save_heatmap_pngs,
    score_maps,
)
from medvae.anomaly.stats import (
    SCORES,
    LatentStats,
    fit_latent_stats,
    gaussian_blur,
    ledoit_wolf,
    lowpass_error_map,
    score_batch,
)
from medvae.config import ModelConfig
from medvae.engine.inference import as_float_batch
from medvae.vae.losses import kl_divergence, reconstruction_nll
from medvae.vae.model import ConvVAE

SIZE = 16


def _model(latent: int = 4, seed: int = 0, conditional: bool = False) -> ConvVAE:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        channels=(8, 16),
        image_size=SIZE,
        latent_dim=latent,
        conditional=conditional,
        num_classes=2 if conditional else 0,
    )
    return ConvVAE(cfg)


def _images(n: int, low: int = 0, high: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(n, SIZE, SIZE), dtype=np.uint8)


def test_as_float_batch_accepts_uint8_and_float() -> None:
    u8 = _images(3)
    x = as_float_batch(u8)
    assert x.shape == (3, 1, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(as_float_batch(torch.from_numpy(u8)), x)
    assert torch.equal(as_float_batch(x), x)
    assert torch.equal(as_float_batch(x[:, 0]), x)
    assert as_float_batch(u8[0]).shape == (1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_float_batch(u8.astype(np.float32))
    with pytest.raises(ValueError):
        as_float_batch(u8.astype(np.int32))


def test_mahalanobis_matches_hand_computation_and_mode_is_restored() -> None:
    model = _model()
    imgs = _images(10)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    stats = LatentStats(mean=rng.normal(size=4), precision=a @ a.T + np.eye(4))
    model.train()
    scores = score_batch(model, imgs, stats=stats, batch_size=3)
    assert model.training, "score_batch must restore train mode"
    assert set(scores) == set(SCORES)
    assert all(v.dtype == np.float64 and v.shape == (10,) for v in scores.values())

    model.eval()
    with torch.no_grad():
        x = as_float_batch(imgs)
        mu, logvar = model.encode(x)
        out = model(x)
    diff = mu.double().numpy() - stats.mean
    expected = np.sqrt(np.array([d @ stats.precision @ d for d in diff]))
    np.testing.assert_allclose(scores["mahalanobis"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        scores["kl"], kl_divergence(mu.double(), logvar.double()).numpy(), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(scores["recon"], reconstruction_nll(out, x, "bce").numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["elbo"], scores["recon"] + scores["kl"])


def _lw_bruteforce(x: np.ndarray) -> tuple[np.ndarray, float]:
    # Ledoit & Wolf (2004) written out term by term, to check the vectorised version.
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta2 = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta2 = sum(np.sum((np.outer(r, r) - s) ** 2) / d for r in xc) / n**2
    shrink = min(beta2, delta2) / delta2
    return (1 - shrink) * s + shrink * mu * np.eye(d), shrink


def test_ledoit_wolf_matches_bruteforce() -> None:
    x = np.random.default_rng(0).normal(size=(7, 5)) * np.array([1, 2, 3, 0.5, 1])
    _, cov, shrink = ledoit_wolf(x)
    ref_cov, ref_shrink = _lw_bruteforce(x)
    assert shrink == pytest.approx(ref_shrink)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)


def test_shrunk_precision_is_spd_with_fewer_images_than_dims() -> None:
    model = _model(latent=8)
    stats = fit_latent_stats(model, _images(3))
    p = stats.precision
    assert p.shape == (8, 8) and stats.mean.shape == (8,) and stats.n_images == 3
    assert np.all(np.isfinite(p))
    np.testing.assert_array_equal(p, p.T)
    assert np.linalg.eigvalsh(p).min() > 0
    assert 0.0 < stats.shrinkage <= 1.0
    with pytest.raises(ValueError):
        fit_latent_stats(model, _images(1))


def test_threshold_flags_at_most_fpr_of_normals() -> None:
    vals = np.arange(1, 101, dtype=np.float64)
    thr = threshold_at_fpr(vals, 0.05)
    assert np.sum(vals > thr) <= 5
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 19, 100, 333):
        for fpr in (0.01, 0.05, 0.1, 0.5):
            v = rng.normal(size=n)
            assert np.sum(v > threshold_at_fpr(v, fpr)) <= fpr * n


def _hand_calibration(normal: np.ndarray) -> Calibration:
    stats = LatentStats(mean=np.zeros(2), precision=np.eye(2))
    return Calibration("recon", threshold_at_fpr(normal, 0.05), 0.05, np.sort(normal), stats, len(normal))


def test_percentile_among_normals_monotone_and_100_at_max() -> None:
    cal = _hand_calibration(np.arange(1, 101, dtype=np.float64))
    s = np.linspace(-5, 120, 500)
    p = percentile_among_normals(s, cal)
    assert np.all(np.diff(p) >= 0)
    assert p[0] == 0.0 and p[-1] == 100.0
    assert percentile_among_normals(np.array([100.0]), cal)[0] == 100.0
    assert percentile_among_normals(np.array([50.0]), cal)[0] == 50.0


def test_screen_flags_out_of_distribution_images() -> None:
    # Type A: dark noisy images (the "normals"); type B: bright ones. Even a random-init encoder maps
    # them to different latent regions, so B must sit further from the A statistics.
    model = _model(seed=0)
    train, val, test_a = _images(64, 0, 60, seed=1), _images(64, 0, 60, seed=2), _images(32, 0, 60, seed=3)
    test_b = _images(32, 190, 256, seed=4)
    cal = calibrate(model, train, val, score="mahalanobis", fpr=0.05)
    assert cal.n_val == 64 and np.sum(cal.normal_scores > cal.threshold) <= 0.05 * 64
    ra, rb = screen(model, test_a, cal), screen(model, test_b, cal)
    assert set(ra) == {*SCORES, "score", "percentile", "unlike", "flag"}
    assert ra["flag"].dtype == bool
    np.testing.assert_array_equal(ra["score"], ra["mahalanobis"])
    assert rb["mahalanobis"].mean() > 3 * ra["mahalanobis"].mean()
    assert rb["flag"].mean() > ra["flag"].mean()
    assert rb["flag"].all() and rb["percentile"].min() == 100.0


def test_calibration_round_trips_through_json_and_safetensors() -> None:
    model = _model()
    cal = calibrate(model, _images(20, seed=1), _images(15, seed=2), score="elbo", fpr=0.1, recon_kind="mse")
    meta, tensors = cal.to_files()
    meta2 = json.loads(json.dumps(meta))
    tensors2 = st_load(st_save(tensors))
    back = Calibration.from_files(meta2, tensors2)
    assert (back.score, back.threshold, back.fpr, back.n_val, back.recon_kind, back.default_label) == (
        "elbo",
        cal.threshold,
        0.1,
        15,
        "mse",
        None,
    )
    np.testing.assert_array_equal(back.normal_scores, cal.normal_scores)
    np.testing.assert_array_equal(back.stats.mean, cal.stats.mean)
    np.testing.assert_array_equal(back.stats.precision, cal.stats.precision)
    assert back.stats.shrinkage == cal.stats.shrinkage and back.stats.n_images == 20
    assert back.roi.dtype == bool and cal.roi.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(back.roi, cal.roi)
    old = Calibration.from_files(meta2, {k: v for k, v in tensors2.items() if k != "roi"})
    assert old.roi.size == 0  # a calibration written before the region existed scores every pixel
    # The tensors own their memory: writing to them must not change the calibration.
    tensors["normal_scores"].zero_()
    assert cal.normal_scores.max() > 0
    with pytest.raises(ValueError):
        Calibration.from_files({**meta2, "format": "other"}, tensors2)


def test_only_a_recalibrated_threshold_goes_without_the_cohort_warning() -> None:
    """A threshold from the training cohort's normals says it may not hold elsewhere; one set on local
    normals does not, and which it is survives the files (older files: ``recalibrated_on``)."""
    model = _model()
    cal = calibrate(model, _images(20, seed=1), _images(15, seed=2), fpr=0.05)
    (warning,) = cohort_warnings(cal)
    assert "training cohort" in warning and "medvae recalibrate" in warning and "5%" in warning
    local = recalibrate(model, cal, _images(12, seed=3))
    assert local.local and not cal.local and cohort_warnings(local) == []
    for c, expect in ((cal, False), (local, True)):
        meta, tensors = c.to_files()
        assert Calibration.from_files(json.loads(json.dumps(meta)), tensors).local is expect
    meta, tensors = cal.to_files()
    del meta["cohort"]
    assert not Calibration.from_files(meta, tensors).local
    assert Calibration.from_files({**meta, "recalibrated_on": 12}, tensors).local


@pytest.mark.parametrize(
    ("scored", "flagged", "warns"),
    [(216, 216, True), (20, 10, True), (20, 9, False), (19, 19, False), (200, 2, False)],
    ids=["all-flagged", "half-of-20", "under-half", "too-few-scans", "a-normal-batch"],
)
def test_a_screen_that_flags_most_of_its_batch_says_it_may_be_blind(
    scored: int, flagged: int, warns: bool
) -> None:
    """Half a batch flagged cannot be false positives at a 5 % rate: the run says it may be another cohort."""
    out = flagged_share_warnings(scored, flagged, 0.05)
    assert bool(out) is warns
    if warns:
        assert f"flagged {flagged} of {scored} scans" in out[0] and "5%" in out[0]
        assert "medvae evaluate" in out[0]


def test_recalibrating_on_normals_the_old_threshold_mostly_flagged_says_sensitivity_is_unmeasured() -> None:
    (warning,) = site_shift_warnings(1.0, 300)
    assert "flagged 100% of these normal scans" in warning and "unmeasured" in warning
    assert site_shift_warnings(0.11, 300) == []  # Kermany's new batch: a milder shift, nothing to add
    assert site_shift_warnings(0.9, 19) == []  # too few normals for a share to mean much
    assert site_shift_warnings(0.5, 20) != []


def test_conditional_model_needs_labels_or_default() -> None:
    model = _model(conditional=True)
    imgs = _images(6)
    with pytest.raises(ValueError, match="default_label"):
        fit_latent_stats(model, imgs)
    cal = calibrate(model, imgs, _images(4, seed=5), train_labels=[0, 1, 0, 1, 0, 1], default_label=0)
    assert cal.default_label == 0
    meta, tensors = cal.to_files()
    assert Calibration.from_files(json.loads(json.dumps(meta)), tensors).default_label == 0
    # Screening new scans without labels scores them against the stored normal class ...
    unlabelled = screen(model, imgs, cal)
    as_normal = screen(model, imgs, cal, labels=np.zeros(6, dtype=np.int64))
    np.testing.assert_array_equal(unlabelled["score"], as_normal["score"])
    # ... and unknown (-1) labels are filled the same way.
    mixed = screen(model, imgs, cal, labels=np.array([-1, 1, -1, 1, -1, 1]))
    as_given = screen(model, imgs, cal, labels=np.array([0, 1, 0, 1, 0, 1]))
    np.testing.assert_array_equal(mixed["score"], as_given["score"])
    with pytest.raises(ValueError, match=r"0\.\.1"):
        screen(model, imgs, cal, labels=np.full(6, 2))


def test_reconstruction_error_maps_equal_abs_error_of_eval_reconstruction() -> None:
    model = _model()
    imgs = _images(5)
    maps = reconstruction_error_maps(model, imgs)
    assert maps.shape == (5, SIZE, SIZE) and maps.dtype == np.float32
    model.eval()
    with torch.no_grad():
        x = as_float_batch(imgs)
        expected = (x - model(x).recon).abs()[:, 0].numpy()
    np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_save_heatmap_pngs_sanitises_names(tmp_path: Path) -> None:
    out = tmp_path / "maps"
    imgs = _images(5)
    maps = np.random.default_rng(0).random((5, SIZE, SIZE))
    names = ["../../evil", "a/b\\c", "ok name", "..", "ok_name"]
    captions = [f"score {i}\nflagged" for i in range(5)]
    paths = save_heatmap_pngs(imgs, maps, out, names, captions=captions, scale=2)
    assert len(paths) == 5 and len(set(paths)) == 5
    for p in paths:
        assert p.resolve().parent == out.resolve() and p.exists()
        assert all(c.isalnum() or c in "._-" for c in p.name) and not p.name.startswith(".")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["maps"]
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB" and im.size[1] > 2 * SIZE  # the caption strip sits below the panels
        left = np.asarray(im)[: 2 * SIZE : 2, : 2 * SIZE : 2, 0]
    np.testing.assert_array_equal(left, imgs[0])


def test_occlusion_maps_find_the_patch_that_raises_the_score(monkeypatch: pytest.MonkeyPatch) -> None:
    """A score driven by one bright square: occluding the square with the mean normal image lowers it, so
    the map's heat sits on the square and nowhere else."""
    import medvae.anomaly.stats as stats_mod

    def square_score(model: object, images: torch.Tensor, labels: object = None, **kw: object) -> dict:
        x = as_float_batch(images)
        return {"mahalanobis": x[:, 0, 4:12, 4:12].mean(dim=(1, 2)).double().numpy()}

    model = _model()
    cal = calibrate(model, _images(24, high=60), _images(8, high=60, seed=3), score="mahalanobis", fpr=0.1)
    monkeypatch.setattr(stats_mod, "score_batch", square_score)
    odd = cal.mean_image.copy()
    odd[4:12, 4:12] = 1.0
    maps = occlusion_maps(model, np.round(odd * 255).astype(np.uint8)[None], cal, patch=4, stride=2)
    assert maps.shape == (1, SIZE, SIZE) and (maps >= 0).all()
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[4:12, 4:12] = True
    assert maps[0][mask].mean() > 0.1 and maps[0][~mask].mean() < 0.5 * maps[0][mask].mean()
    far = np.zeros_like(mask)
    far[:, 14:] = True  # no occluder covering these pixels touches the square
    assert float(maps[0][far].max()) == 0.0


def test_occlusion_maps_of_a_real_model_are_finite_and_non_negative() -> None:
    model = _model()
    cal = calibrate(model, _images(24), _images(8, seed=3), fpr=0.1)
    maps = occlusion_maps(model, _images(3, seed=5), cal)
    assert maps.shape == (3, SIZE, SIZE) and np.isfinite(maps).all() and (maps >= 0).all()


def test_the_lowpass_heat_map_is_the_score_pixel_by_pixel() -> None:
    """The screen's map of the default score sums to each image's score and is 0 outside the region."""
    from dataclasses import replace

    model = _model()
    roi = np.zeros((SIZE, SIZE), dtype=bool)
    roi[2:14, 3:9] = True
    cal = replace(calibrate(model, _images(24), _images(8, seed=3), fpr=0.1), roi=roi)
    assert cal.score == "lowpass_error"
    imgs = _images(5, seed=9)
    maps = score_maps(model, imgs, cal)
    scores = score_batch(model, imgs, stats=cal.stats, recon_kind=cal.recon_kind, roi=roi)["lowpass_error"]
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), scores, rtol=1e-5)
    assert float(np.abs(maps[:, ~roi]).max()) == 0.0 and maps[:, roi].max() > 0
    whole = lowpass_maps(model, imgs, cal, whole_image=True)
    np.testing.assert_allclose(whole[:, roi], maps[:, roi], rtol=1e-6)  # the same error, unmasked
    assert whole[:, ~roi].max() > 0


def test_the_heat_map_of_a_latent_score_is_its_occlusion_map() -> None:
    model = _model()
    cal = calibrate(model, _images(24), _images(8, seed=3), score="mahalanobis", fpr=0.1)
    imgs = _images(2, seed=9)
    np.testing.assert_array_equal(score_maps(model, imgs, cal), occlusion_maps(model, imgs, cal))


def test_gaussian_blur_is_scipys_gaussian_filter() -> None:
    from scipy.ndimage import gaussian_filter

    x = np.random.default_rng(0).random((3, 20, 24))
    got = gaussian_blur(torch.from_numpy(x)[:, None], 2.0)[:, 0].numpy()
    np.testing.assert_allclose(got, np.stack([gaussian_filter(v, 2.0) for v in x]), atol=1e-12)
    assert torch.equal(gaussian_blur(torch.from_numpy(x)[:, None], 0.0)[:, 0], torch.from_numpy(x))


def test_the_lowpass_error_ignores_grain_sees_blobs_and_counts_only_the_region() -> None:
    """Two departures of equal squared error: pixel-scale grain (a film's sharpness) barely moves the
    score, a lung-sized blob does; pixels outside the region of interest never count."""
    base = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    grain = base + 0.1 * (torch.arange(32)[:, None] + torch.arange(32)[None, :]).remainder(2).mul(2).sub(1)
    blob = base.clone()
    blob[..., 8:24, 10:26] += 0.2  # 256 pixels of 0.2: the squared error of 1024 pixels of 0.1 grain
    assert float(((grain - base) ** 2).sum()) == pytest.approx(float(((blob - base) ** 2).sum()))
    e_grain = float(lowpass_error_map(grain, base).sum())
    e_blob = float(lowpass_error_map(blob, base).sum())
    assert e_blob > 20 * e_grain
    roi = np.zeros((32, 32), dtype=bool)
    roi[:, :4] = True  # 3 blur widths from the blob
    inside = lowpass_error_map(blob, base, roi)
    assert float(inside[0][~torch.from_numpy(roi)].abs().max()) == 0.0
    assert float(inside.sum()) < 0.05 * e_blob


def test_the_lowpass_score_is_the_sum_of_its_map_inside_the_calibrated_region() -> None:
    model = _model()
    cal = calibrate(model, _images(24), _images(8, seed=3), fpr=0.1)
    assert cal.score == "lowpass_error"  # what a new model screens with
    test = _images(4, seed=5)
    x = as_float_batch(test).double()
    with torch.no_grad():
        recon = model.eval()(x.float()).recon.double()
    expect = lowpass_error_map(x, recon, cal.roi).sum(dim=(1, 2)).numpy()
    got = screen(model, test, cal)
    np.testing.assert_allclose(got["lowpass_error"], expect, rtol=1e-5)
    np.testing.assert_array_equal(got["score"], got["lowpass_error"])


def test_scans_far_outside_the_normals_are_flagged_whatever_their_lowpass_error() -> None:
    model = _model()
    cal = calibrate(model, _images(24, high=60), _images(8, high=60, seed=3), fpr=0.1)
    top = float(cal.by_score["mahalanobis"].max())
    np.testing.assert_array_equal(
        unlike_training(np.array([top, 1.49 * top, 1.51 * top]), cal, 1.5), [False, False, True]
    )
    assert not unlike_training(np.array([1e9]), cal, 0.0).any()  # 0 turns the check off
    bright = _images(6, 200, 256, seed=4)
    plain = screen(model, bright, cal)
    guarded = screen(model, bright, cal, unlike_factor=1.0)
    assert not plain["unlike"].any() and guarded["unlike"].any()
    np.testing.assert_array_equal(guarded["flag"], plain["flag"] | guarded["unlike"])
    # The guard never flags the normals the threshold was set on (at a factor of at least 1).
    assert not unlike_training(cal.by_score["mahalanobis"], cal, 1.0).any()


def test_a_lowpass_calibration_without_lung_fields_says_it_counts_the_whole_image() -> None:
    from dataclasses import replace

    cal = calibrate(_model(), _images(24), _images(8, seed=3), fpr=0.1)
    whole = replace(cal, roi=np.ones((SIZE, SIZE), dtype=bool))
    assert any("no lung fields" in w for w in calibration_warnings(whole))
    lungs = np.zeros((SIZE, SIZE), dtype=bool)
    lungs[4:12, 2:7] = lungs[4:12, 9:14] = True
    assert not any("no lung fields" in w for w in calibration_warnings(replace(cal, roi=lungs)))
    assert not any("no lung fields" in w for w in calibration_warnings(replace(whole, score="mahalanobis")))
