"""Detail restoration: a fitted unsharp mask that gives decoded samples the training images' sharpness."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medvae.synth.detail import MAX_GAIN, DetailRestoration, fit_gain, sharpness, unsharp
from medvae.synth.latent import UNCONDITIONAL


def _textured(n: int = 8, seed: int = 0) -> np.ndarray:
    """'Real' images: a smooth body with fine (a few pixels wide) texture on top (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    body = 120 + 40 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    texture = gaussian_filter(rng.normal(0, 30, (n, 32, 32)), (0, 0.8, 0.8))
    return np.clip(body + texture, 0, 255).astype(np.uint8)


def _blurred(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """What a decoder's mean does to them: the fine texture is averaged away."""
    return np.rint(gaussian_filter(images.astype(np.float32), (0, sigma, sigma))).astype(np.uint8)


def test_sharpness_is_the_mean_neighbour_difference() -> None:
    flat = np.full((2, 8, 8), 77, np.uint8)
    assert sharpness(flat) == 0.0
    stripes = np.zeros((1, 8, 8), np.uint8)
    stripes[:, :, ::2] = 10  # horizontal neighbours differ by 10, vertical ones by 0
    assert sharpness(stripes) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no images"):
        sharpness(np.zeros((0, 8, 8), np.uint8))


def test_unsharp_leaves_gain_zero_alone_and_sharpens_monotonically() -> None:
    x = _blurred(_textured())
    np.testing.assert_array_equal(unsharp(x, 0.0), x)
    levels = [sharpness(unsharp(x, g)) for g in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(levels)), levels
    out = unsharp(x, 4.0)
    assert out.dtype == np.uint8 and out.shape == x.shape
    # A flat region has no high-pass part: the mask adds no edge of its own, not even at the border.
    flat = np.full((1, 16, 16), 200, np.uint8)
    np.testing.assert_array_equal(unsharp(flat, 3.0), flat)
    with pytest.raises(ValueError, match="gain"):
        unsharp(x, -1.0)


def test_fitted_gain_brings_blurred_images_to_the_real_sharpness() -> None:
    real = _textured(seed=1)
    decoded = _blurred(_textured(seed=2))
    target = sharpness(real)
    assert sharpness(decoded) < 0.6 * target  # the blur really removed detail
    gain = fit_gain(decoded, target)
    assert 0 < gain < MAX_GAIN
    assert sharpness(unsharp(decoded, gain)) == pytest.approx(target, rel=0.01)
    assert fit_gain(real, sharpness(decoded)) == 0.0  # already sharper than asked: left alone
    assert fit_gain(np.full((2, 8, 8), 50, np.uint8), target) == MAX_GAIN  # nothing to sharpen


def test_restoration_fits_one_gain_per_label_and_round_trips() -> None:
    real = {0: _textured(seed=3), 1: _blurred(_textured(seed=4), 0.6)}  # label 1's real scans are softer
    decoded = {0: _blurred(_textured(seed=5)), 1: _blurred(_textured(seed=6))}
    r = DetailRestoration.fit(decoded, real)
    assert r.gains[0] > r.gains[1] > 0
    for c in (0, 1):
        assert sharpness(r.apply(decoded[c], c)) == pytest.approx(sharpness(real[c]), rel=0.01)
        rec = r.meta["sharpness"][str(c)]
        assert rec["restored"] == pytest.approx(rec["training_images"], rel=0.01) and rec["n_decoded"] == 8
    back = DetailRestoration.from_json(r.to_json())
    assert back == r
    np.testing.assert_array_equal(back.apply(decoded[1], 1), r.apply(decoded[1], 1))
    # A label without a fitted gain (and the unconditional key, here absent) is left as decoded.
    np.testing.assert_array_equal(r.apply(decoded[0], None), decoded[0])
    assert UNCONDITIONAL not in r.gains
