"""Tests for intensity windowing and geometric normalisation (medvae.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest

from medvae.data.transforms import (
    area_weights,
    luminance,
    normalise,
    percentile_window,
    quantize,
    resize_area,
    standardise_intensity,
    to_square,
    window,
)

# ---------------------------------------------------------------------------------------------- window


def test_window_maps_bounds_linearly_and_clips() -> None:
    img = np.array([-100, 0, 50, 100, 200], dtype=np.int16)
    out = window(img, 0, 100)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_window_does_not_modify_float_input() -> None:
    img = np.array([0.25, 0.75], dtype=np.float32)
    window(img, 0.0, 0.5)
    np.testing.assert_array_equal(img, [0.25, 0.75])


@pytest.mark.parametrize(("low", "high"), [(5, 5), (10, 0), (0, float("nan"))])
def test_window_rejects_empty_or_inverted_range(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="high > low"):
        window(np.zeros(3), low, high)


# ------------------------------------------------------------------------------------ percentile_window


def test_percentile_window_constant_image_is_zeros_without_nan() -> None:
    with np.errstate(all="raise"):  # any division by zero would raise here
        out = percentile_window(np.full((8, 8), 1234, dtype=np.uint16))
    assert out.dtype == np.float32
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)


def test_percentile_window_spans_zero_to_one_and_clips_outliers() -> None:
    img = np.arange(1000, dtype=np.float64)
    img[0], img[-1] = -1e9, 1e9  # hot pixels must not squash the rest
    out = percentile_window(img, (1.0, 99.0))
    assert out.min() == 0.0 and out.max() == 1.0
    # The bulk keeps its contrast: the middle value sits near the middle of the window.
    assert out[500] == pytest.approx(0.5, abs=0.01)


def test_percentile_window_keeps_small_object_when_percentiles_collapse() -> None:
    img = np.zeros((100, 100), dtype=np.uint16)
    img[0, 0] = 4000  # 0.01 % of pixels: both default percentiles are 0
    out = percentile_window(img)
    assert out[0, 0] == 1.0
    assert out.sum() == 1.0


def test_percentile_window_ignores_non_finite_values() -> None:
    img = np.array([0.0, 1.0, 2.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    out = percentile_window(img, (0.0, 100.0))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 0.0, 0.0])


def test_percentile_window_rejects_bad_percentiles() -> None:
    with pytest.raises(ValueError):
        percentile_window(np.arange(4), (50.0, 10.0))


# -------------------------------------------------------------------------------------------- to_square


def test_to_square_pad_keeps_all_pixels_centred_with_black_borders() -> None:
    img = np.ones((2, 5), dtype=np.float32)
    out = to_square(img, "pad")
    assert out.shape == (5, 5)
    # 3 rows of padding: 1 above, 2 below (the odd pixel goes to the bottom).
    np.testing.assert_array_equal(out[:, 0], [0, 1, 1, 0, 0])
    assert out.sum() == img.sum()


def test_to_square_crop_keeps_the_centre() -> None:
    img = np.arange(3 * 7).reshape(3, 7)
    out = to_square(img, "crop")
    assert out.shape == (3, 3)
    np.testing.assert_array_equal(out, img[:, 2:5])
    tall = np.arange(6 * 2).reshape(6, 2)
    np.testing.assert_array_equal(to_square(tall, "crop"), tall[2:4])


def test_to_square_leaves_square_images_alone_and_rejects_unknown_policy() -> None:
    img = np.zeros((4, 4))
    assert to_square(img, "pad") is img
    with pytest.raises(ValueError, match="policy"):
        to_square(np.zeros((2, 3)), "stretch")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ resize_area


@pytest.mark.parametrize(
    ("shape", "size"),
    [((224, 224), 64), ((716, 512), 64), ((3, 3), 64), ((1, 1), 8), ((4000, 37), 64), ((64, 64), 3)],
)
def test_resize_area_preserves_constant_and_mean(shape: tuple[int, int], size: int) -> None:
    const = np.full(shape, 0.37, dtype=np.float32)
    out = resize_area(const, size)
    assert out.shape == (size, size)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, atol=1e-5)

    # A gradient's mean survives any factor, up or down (area averaging conserves mass per unit area).
    grad = np.add.outer(np.linspace(0, 1, shape[0]), np.linspace(0, 2, shape[1])).astype(np.float32)
    assert resize_area(grad, size).mean() == pytest.approx(grad.mean(), abs=1e-5)


def test_resize_area_is_anti_aliased() -> None:
    # A one-pixel checkerboard (the worst case for point sampling) must average to flat grey.
    checker = (np.indices((640, 640)).sum(axis=0) % 2).astype(np.float32)
    out = resize_area(checker, 64)
    np.testing.assert_allclose(out, 0.5, atol=1e-5)


def test_resize_area_upsamples_tiny_image_into_blocks() -> None:
    img = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    out = resize_area(img, 64)
    assert out[:32, :32].max() == 0.0 and out[:32, 32:].min() == 1.0


@pytest.mark.parametrize(
    ("shape", "out"),
    [
        ((112, 112), (64, 64)),
        ((700, 1000), (64, 64)),
        ((97, 31), (64, 17)),
        ((3, 5), (64, 64)),
        ((5, 200), (64, 64)),
    ],
)
def test_resize_area_matches_scikit_image_resize_local_mean(
    shape: tuple[int, int], out: tuple[int, int]
) -> None:
    # scikit-image is the reference implementation of pixel mixing; ours only caches its weights.
    from skimage.transform import resize_local_mean

    img = np.random.default_rng(1).random(shape).astype(np.float32) * 1000
    ref = resize_local_mean(img, out, grid_mode=True, preserve_range=True)
    np.testing.assert_allclose(resize_area(img, out), ref, rtol=0, atol=1e-3)


def test_area_weights_rows_sum_to_one_and_are_cached() -> None:
    w = area_weights(224, 64)
    assert w.shape == (64, 224)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert area_weights(224, 64) is w and not w.flags.writeable


def test_resize_area_returns_a_copy_and_rejects_bad_input() -> None:
    img = np.zeros((8, 8), dtype=np.float32)
    out = resize_area(img, 8)
    out[0, 0] = 1.0
    assert img[0, 0] == 0.0
    with pytest.raises(ValueError):
        resize_area(np.zeros((4, 4, 3)), 2)
    with pytest.raises(ValueError):
        resize_area(img, 0)


# --------------------------------------------------------------------------------------------- quantize


def test_quantize_rounds_to_nearest_not_floor() -> None:
    img = np.array([0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.5 / 255 + 1e-6, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(img), [0, 0, 1, 128, 255, 255])
    assert quantize(img).dtype == np.uint8


def test_quantize_clips_and_maps_nan_to_zero() -> None:
    img = np.array([-0.5, 1.5, np.nan, np.inf, -np.inf, 3e38], dtype=np.float32)
    np.testing.assert_array_equal(quantize(img), [0, 255, 0, 255, 0, 255])
    assert quantize(np.float64(0.5)).shape == () and int(quantize(np.float64(0.5))) == 128


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_quantize_is_the_float32_round_of_the_clipped_image(dtype: type) -> None:
    """Every stored pixel goes through quantize: it must be exactly round(clip(float32(x), 0, 1) * 255)."""
    rng = np.random.default_rng(3)
    img = np.concatenate([rng.random(5000) * 1.4 - 0.2, (np.arange(256) + 0.5) / 255]).astype(dtype)
    reference = np.rint(np.clip(img.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    np.testing.assert_array_equal(quantize(img), reference)


# ------------------------------------------------------------------------------------ normalise, luminance


def test_normalise_pads_then_resizes_to_uint8_square() -> None:
    img = np.ones((32, 64), dtype=np.float32)  # wide: pad adds 16 black rows above and below
    out = normalise(img, size=16, policy="pad")
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert (out[:4] == 0).all() and (out[12:] == 0).all() and (out[4:12] == 255).all()
    cropped = normalise(img, size=16, policy="crop")
    assert (cropped == 255).all()


def test_luminance_uses_bt601_weights() -> None:
    rgb = np.array([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]], dtype=np.float32)
    np.testing.assert_allclose(luminance(rgb), [[0.299, 0.587, 0.114, 0.5]], atol=1e-6)


def test_luminance_ignores_alpha_and_rejects_other_channel_counts() -> None:
    rgba = np.array([[[1.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(luminance(rgba), [[0.299]], atol=1e-6)
    assert luminance(rgba).dtype == np.float32
    with pytest.raises(ValueError):
        luminance(np.zeros((2, 2, 2)))


def test_standardise_intensity_stretches_contrast_and_leaves_blank_images() -> None:
    rng = np.random.default_rng(0)
    dull = (100 + rng.integers(0, 20, (64, 64))).astype(np.uint8)  # 20 grey levels in use
    for method in ("clahe", "equalize"):
        out = standardise_intensity(dull, method)
        assert out.dtype == np.uint8 and out.shape == dull.shape
        assert int(out.max()) - int(out.min()) > 150
    blank = np.full((64, 64), 37, np.uint8)
    assert standardise_intensity(blank, "clahe") is blank
    assert standardise_intensity(dull, "none") is dull
    with pytest.raises(ValueError, match="unknown intensity"):
        standardise_intensity(dull, "zscore")  # type: ignore[arg-type]
