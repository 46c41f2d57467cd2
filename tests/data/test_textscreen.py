"""The burned-in text screen's vectorised parts against the library calls they replace, and its batch
form against screening one image at a time."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from medvae.data.textscreen import (
    _components,
    _flat_filter,
    _median_uint8,
    _texture_cut,
    find_text,
    find_text_batch,
)


@pytest.mark.parametrize("k", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("shape", [(3, 13, 40), (2, 22, 112), (1, 45, 224)])
def test_flat_filters_equal_scipy_min_and_max_filters(k: int, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(k)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(_flat_filter(x, k, np.minimum), ndi.minimum_filter(x, size=(1, k, k)))
    assert np.array_equal(_flat_filter(x, k, np.maximum), ndi.maximum_filter(x, size=(1, k, k)))


@pytest.mark.parametrize("shape", [(4, 22, 112), (3, 7, 9), (2, 1, 1)])
def test_median_of_uint8_slices_equals_numpy_median(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 40, size=shape, dtype=np.uint8)  # few levels: ties at the middle are common
    assert np.array_equal(_median_uint8(x), np.median(x.reshape(len(x), -1), axis=1))


def test_the_texture_cut_is_max_of_base_and_four_medians() -> None:
    # Slices whose medians fall below, at and above base / 4 (the shortcut's boundary).
    rng = np.random.default_rng(7)
    x = np.stack([rng.integers(0, hi, size=(22, 112), dtype=np.uint8) for hi in (2, 9, 15, 16, 17, 40, 255)])
    x[3, :11] = 7  # exactly half at the boundary value
    want = np.maximum(31, 4.0 * np.median(x.reshape(len(x), -1), axis=1))
    assert np.array_equal(_texture_cut(x, 31), want)
    assert (want > 31).any() and (want == 31).any()


def _radiograph(side: int, seed: int, text: str | None, top: bool, bright: bool) -> np.ndarray:
    """A smooth noisy 'radiograph', with a line of text drawn in the top or bottom band when asked."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = 70 + 90 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.08) + rng.normal(0, 6, (side, side))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    if text:
        font = ImageFont.load_default(size=max(8, side // 14))
        y = side // 40 if top else side - side // 9
        ImageDraw.Draw(img).text((side // 30, y), text, fill=250 if bright else 5, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def test_a_batch_finds_what_each_image_alone_finds() -> None:
    # Mixed sizes (one at 112 px, as a 224 px JPEG is decoded; large ones are block-averaged first),
    # text top and bottom, bright and dark, and images without text, in one batch.
    images = [
        _radiograph(side, seed, "DOE^JOHN 1912-12-01" if seed % 3 else None, seed % 2 == 0, seed % 4 < 2)
        for seed, side in enumerate([112, 112, 112, 256, 256, 112, 640, 640, 112, 256, 112, 112])
    ]
    images.append(np.zeros((6, 30), dtype=np.float32))  # too small to screen: never a finding
    batch = find_text_batch(images, 64)
    assert batch == [find_text(img, 64) for img in images]
    # Every image with text is flagged and no other: the comparison above saw both outcomes.
    assert [i for i, f in enumerate(batch) if f is not None] == [i for i in range(12) if i % 3]


def _scipy_components(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """What _components should give, from scipy's labelling (4-connected within each slice)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    labels, _ = ndi.label(mask, structure=structure)
    boxes = ndi.find_objects(labels)
    areas = np.bincount(labels.ravel())[1:]
    cols = [
        [sl[0].start for sl in boxes],
        [sl[1].start for sl in boxes],
        [sl[1].stop for sl in boxes],
        [sl[2].start for sl in boxes],
        [sl[2].stop for sl in boxes],
        list(areas),
    ]
    return tuple(np.asarray(c, dtype=np.intp) for c in cols)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.55, 0.8, 1.0])
def test_components_equal_scipy_labels_in_the_same_order(density: float) -> None:
    # Random masks at every density (0.55 is above the percolation threshold: long winding components
    # that need many union-find rounds), in slices that touch end to end in memory.
    rng = np.random.default_rng(int(density * 100))
    mask = rng.random((5, 17, 31)) < density
    mask[2, -1, :] = mask[3, 0, :] = True  # a full last row above a full first row: must not join
    got = _components(mask)
    want = _scipy_components(mask)
    assert len(got[0]) == len(want[0])
    for g, wnt in zip(got, want, strict=True):
        assert np.array_equal(g, wnt)


def test_components_of_a_spiral_and_of_nested_shapes() -> None:
    # A one-pixel-wide spiral is one component whose runs join only through long chains.
    side = 41
    spiral = np.zeros((side, side), dtype=bool)
    top, left, bottom, right = 0, 0, side - 1, side - 1
    while top <= bottom and left <= right:
        spiral[top, left : right + 1] = True
        spiral[top : bottom + 1, right] = True
        spiral[bottom, left : right + 1] = True
        spiral[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            spiral[top - 1, left] = True  # the turn into the next ring
    ring = np.zeros((side, side), dtype=bool)
    ring[5:30, 5:30] = True
    ring[8:27, 8:27] = False
    ring[12:20, 12:20] = True  # an island inside a ring: two components
    mask = np.stack([spiral, ring])
    for g, wnt in zip(_components(mask), _scipy_components(mask), strict=True):
        assert np.array_equal(g, wnt)


def test_a_batch_of_large_images_is_screened_without_stacking_them() -> None:
    import tracemalloc

    rng = np.random.default_rng(3)
    images = [rng.random((1500, 1500), dtype=np.float32) for _ in range(8)]  # 72 MB in all
    tracemalloc.start()
    try:
        find_text_batch(images, 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # stacking them would take 72 MiB
