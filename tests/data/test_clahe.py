"""The batched CLAHE (medvae.data.clahe) against scikit-image's equalize_adapthist, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvae.data.clahe import clahe_batch
from medvae.data.transforms import quantize, standardise_batch, standardise_intensity

KERMANY = Path(__file__).resolve().parents[3] / "shared" / "data" / "kermany_train"


def _reference(images: np.ndarray, clip_limit: float, nbins: int = 256) -> np.ndarray:
    from skimage import exposure

    return np.stack(
        [quantize(exposure.equalize_adapthist(x, clip_limit=clip_limit, nbins=nbins)) for x in images]
    )


def _varied(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Images of every kind that stresses a different branch: noise over the full range, a narrow grey
    band, smooth gradients (few bins per tile: large excess), black padding with bright bars, two levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            im = rng.integers(0, 256, shape)
        elif kind == 1:
            im = 100 + rng.integers(0, 20, shape)
        elif kind == 2:
            im = (xx * rng.uniform(0.5, 4) + yy * rng.uniform(0, 2)) % 256
        elif kind == 3:
            im = rng.integers(0, 256, shape)
            im[:, : shape[1] // 3] = 0
            im[shape[0] // 4 : shape[0] // 4 + 3] = 255
        else:
            im = np.where(rng.random(shape) < 0.5, 10, 11)
        out.append(im.astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("clip_limit", [0.01, 0.03, 0.2, 1.0, 0.0])
def test_identical_to_scikit_image_at_64px(clip_limit: float) -> None:
    images = _varied(25, (64, 64), seed=int(clip_limit * 100))
    ours = clahe_batch(images, clip_limit)
    np.testing.assert_array_equal(ours, _reference(images, clip_limit))


@pytest.mark.parametrize("shape", [(8, 8), (17, 17), (100, 100), (48, 80), (9, 130)])
def test_identical_to_scikit_image_at_other_shapes(shape: tuple[int, int]) -> None:
    """Sides that are not multiples of 8 pad with reflected pixels into the histogram tiles."""
    images = _varied(10, shape, seed=shape[0])
    np.testing.assert_array_equal(clahe_batch(images, 0.01), _reference(images, 0.01))
    np.testing.assert_array_equal(clahe_batch(images, 0.05), _reference(images, 0.05))


def test_identical_to_scikit_image_with_fewer_bins() -> None:
    images = _varied(10, (64, 64), seed=7)
    np.testing.assert_array_equal(clahe_batch(images, 0.02, nbins=128), _reference(images, 0.02, 128))


def test_batch_result_does_not_depend_on_the_batch() -> None:
    images = _varied(40, (64, 64), seed=11)
    whole = clahe_batch(images)
    one_by_one = np.stack([clahe_batch(x[None])[0] for x in images])
    np.testing.assert_array_equal(whole, one_by_one)


def test_blank_images_come_back_unchanged_among_others() -> None:
    images = _varied(6, (64, 64), seed=2)
    images[2] = 0
    images[4] = 200
    out = clahe_batch(images)
    np.testing.assert_array_equal(out[[2, 4]], images[[2, 4]])
    np.testing.assert_array_equal(out[[0, 1, 3, 5]], _reference(images[[0, 1, 3, 5]], 0.01))
    assert clahe_batch(np.zeros((0, 64, 64), np.uint8)).shape == (0, 64, 64)


def test_rejects_what_is_not_a_uint8_stack() -> None:
    with pytest.raises(ValueError, match="uint8"):
        clahe_batch(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        clahe_batch(np.zeros((2, 64, 64), np.float32))
    with pytest.raises(ValueError, match="nbins"):
        clahe_batch(np.zeros((1, 8, 8), np.uint8), nbins=0)


def test_standardise_batch_and_single_image_agree() -> None:
    images = _varied(5, (64, 64), seed=5)
    for method in ("clahe", "equalize"):
        batch = standardise_batch(images, method)
        single = np.stack([standardise_intensity(x, method) for x in images])
        np.testing.assert_array_equal(batch, single)
    assert standardise_batch(images, "none") is images


@pytest.mark.skipif(not KERMANY.is_dir(), reason="shared Kermany data not present")
def test_identical_to_scikit_image_on_real_chest_xrays() -> None:
    from medvae.config import IngestConfig
    from medvae.data.prepare import prepare_file

    cfg = IngestConfig()
    files = sorted(KERMANY.glob("*/*.jpeg"))[::97][:48]
    images = np.stack([prepare_file(f, cfg, standardise=False) for f in files])
    np.testing.assert_array_equal(clahe_batch(images, cfg.clahe_clip_limit), _reference(images, 0.01))
