"""CLAHE over a stack of images at once, pixel for pixel what scikit-image's ``equalize_adapthist`` gives.

scikit-image (``skimage/exposure/_adapthist.py``, after Zuiderveld, Graphics Gems IV) equalises one image
at a time and spends most of its ~3 ms per 64×64 image in Python: one ``np.apply_along_axis`` call per
tile and a redistribution loop per tile. That made CLAHE the most expensive step of an ingest, more
than the JPEG decode. Here the same algorithm runs over every tile of every image of a batch together:

1. uint8 -> uint16 (×257, ``img_as_uint``), rescaled from the image's own min..max to 2**14 grey levels
   and rounded (``rescale_intensity``, ``np.round``), then divided into ``nbins`` bins;
2. reflect-padded so that each side is a whole number of tiles (1/8 of the side) starting half a tile
   early, and one histogram per tile of the unpadded grid;
3. each histogram clipped at ``clip_limit × pixels per tile`` (at least 1), the excess spread evenly and
   then one count at a time by scikit-image's loop (``clip_histogram``), which here advances all tiles
   in lock-step;
4. the cumulative histogram scaled to 0..2**14-1 and truncated (``map_histogram``);
5. every pixel a bilinear blend of its four neighbouring tiles' mappings (edge tiles repeated), with
   float64 products summed in float32 and truncated to uint16, exactly as scikit-image orders them;
6. stretched from the result's min..max to 0..1 in float64 (``rescale_intensity``) and rounded to uint8
   by :func:`medvae.data.transforms.quantize`, the rounding of every stored pixel.

Every float operation is the one scikit-image performs, in the same dtype, so the results are identical,
not merely close (the tests compare the two on random and real images). Integer work uses the
smallest dtypes that hold the values and runs in chunks of images that stay in the CPU cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from medvae.data.transforms import quantize

NR_OF_GRAY = 2**14  # scikit-image's internal grey levels
# Images per pass: the per-tile histograms of a chunk (64 tiles × 256 bins each) stay in L2 cache;
# whole batches at once were measured ~3× slower per image on the 2-core reference machine.
CHUNK = 16


def clahe_batch(images: np.ndarray, clip_limit: float = 0.01, nbins: int = 256) -> np.ndarray:
    """CLAHE of a uint8 ``(N, H, W)`` stack with tiles of 1/8 of each side, quantised back to uint8.

    Identical, pixel for pixel, to ``quantize(skimage.exposure.equalize_adapthist(img,
    clip_limit=clip_limit, nbins=nbins))`` for each image, except that a blank image comes back
    unchanged (scikit-image makes it white).

    Args:
        images: uint8 images of one shape, each at least 1×1.
        clip_limit: the clip limit, normalised to ``[0, 1]`` as in scikit-image (``0``: no clipping, AHE).
        nbins: histogram bins per tile (1..2**14).

    Returns:
        A new uint8 array of the same shape.

    Raises:
        ValueError: when ``images`` is not a uint8 ``(N, H, W)`` stack or ``nbins`` is out of range.
    """
    stack = np.asarray(images)
    if stack.ndim != 3 or stack.dtype != np.uint8 or min(stack.shape[1:]) < 1:
        raise ValueError(f"clahe_batch expects a uint8 (N, H, W) stack, got {stack.dtype} {stack.shape}")
    if not 1 <= nbins <= NR_OF_GRAY:
        raise ValueError(f"nbins must be in 1..{NR_OF_GRAY}, got {nbins}")
    out = stack.copy()
    if not len(stack):
        return out
    flat = stack.reshape(len(stack), -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    live = np.flatnonzero(lo != hi)
    geo = _geometry(stack.shape[1], stack.shape[2], nbins)
    for start in range(0, live.size, CHUNK):
        pick = live[start : start + CHUNK]
        out[pick] = _clahe_chunk(stack[pick], lo[pick], hi[pick], geo, clip_limit)
    return out


@dataclass(frozen=True)
class _Geometry:
    """What depends only on the image shape and ``nbins``: computed once per shape, cached.

    Attributes:
        kernel: the tile shape (1/8 of each side, at least 1).
        pads: reflect padding (before, after) of rows and columns.
        tiles: histogram tiles down and across.
        cells: per pixel, the flat offset (tile index × nbins) of each of its four neighbouring tiles,
            in scikit-image's edge order (up-left, up-right, down-left, down-right); ``(4, H, W)``.
        weights: the matching bilinear weights, float64 ``(4, H, W)``.
        pattern: ``pattern[s, j]`` is True when bin ``j`` is a multiple of step ``s`` (redistribution).
        nbins: histogram bins.
    """

    kernel: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    tiles: tuple[int, int]
    cells: np.ndarray
    weights: np.ndarray
    pattern: np.ndarray
    nbins: int


@lru_cache(maxsize=16)
def _geometry(rows: int, cols: int, nbins: int) -> _Geometry:
    kernel = (max(rows // 8, 1), max(cols // 8, 1))
    (k0, k1), sides = kernel, (rows, cols)
    p = [(k // 2, (k - s % k) % k + math.ceil(k / 2)) for k, s in zip(kernel, sides, strict=True)]
    pads = (p[0], p[1])
    tiles = ((rows + sum(p[0])) // k0 - 1, (cols + sum(p[1])) // k1 - 1)
    r, c = np.arange(rows) + p[0][0], np.arange(cols) + p[1][0]
    # scikit-image edge-pads its tile maps by one tile: block b's neighbour e is tile b + e - 1, clamped.
    down = [np.clip(r // k0 + e - 1, 0, tiles[0] - 1) for e in (0, 1)]
    across = [np.clip(c // k1 + e - 1, 0, tiles[1] - 1) for e in (0, 1)]
    # np.arange(k) / k, as scikit-image computes its interpolation coefficients.
    fr, fc = (r % k0 / k0)[:, None], (c % k1 / k1)[None, :]
    edges = ((0, 0), (0, 1), (1, 0), (1, 1))
    cells = np.stack([(down[e0][:, None] * tiles[1] + across[e1][None, :]) * nbins for e0, e1 in edges])
    weights = np.stack([(fc if e1 else 1 - fc) * (fr if e0 else 1 - fr) for e0, e1 in edges])
    j = np.arange(nbins)
    pattern = np.zeros((nbins + 1, nbins), dtype=bool)
    pattern[1:] = j[None, :] % np.arange(1, nbins + 1)[:, None] == 0
    cells = cells.astype(np.intp)
    for a in (cells, weights, pattern):
        a.flags.writeable = False  # shared by every call through the cache
    return _Geometry(kernel, pads, tiles, cells, weights, pattern, nbins)


def _clahe_chunk(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, geo: _Geometry, clip_limit: float
) -> np.ndarray:
    """CLAHE of a few images that are not blank (``lo < hi``)."""
    binned = _binned_levels(x, lo, hi, geo.nbins)
    hist = _tile_histograms(np.pad(binned, [(0, 0), *geo.pads], mode="reflect"), geo)
    elements = geo.kernel[0] * geo.kernel[1]
    clim = int(np.clip(clip_limit * elements, 1, None)) if clip_limit > 0.0 else elements
    hist = _clip_histograms(hist, clim, geo.pattern, elements)
    # The histogram sum only grows by the redistribution's overshoot, under one count per bin.
    maps = _cumulative_to_level(elements, geo.nbins)[np.cumsum(hist, axis=1, dtype=np.int32)]
    return _stretch_to_uint8(_interpolate(binned, maps, geo))


def _binned_levels(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbins: int) -> np.ndarray:
    """Each pixel's histogram bin (step 1 of the module docstring), via one 256-entry table per image.

    The table is computed with scikit-image's float64 operations on ``257 × value``.
    """
    n = len(x)
    v = np.arange(256, dtype=np.float64)[None, :] * 257.0
    lo257 = lo.astype(np.float64)[:, None] * 257.0
    hi257 = hi.astype(np.float64)[:, None] * 257.0
    scaled = np.round((np.clip(v, lo257, hi257) - lo257) / (hi257 - lo257) * (NR_OF_GRAY - 1) + 0.0)
    bins = scaled.astype(np.int32) // (1 + NR_OF_GRAY // nbins)
    table = bins.astype(np.uint8 if nbins <= 256 else np.uint16)
    index = x.reshape(n, -1) + (np.arange(n, dtype=np.intp) * 256)[:, None]
    return table.reshape(-1)[index].reshape(x.shape)


def _tile_histograms(padded: np.ndarray, geo: _Geometry) -> np.ndarray:
    """One ``nbins`` histogram per tile of every image, int16 (int32 for tiles over 32,767 pixels)."""
    n = len(padded)
    (k0, k1), (t0, t1), nb = geo.kernel, geo.tiles, geo.nbins
    region = padded[:, k0 // 2 : k0 // 2 + t0 * k0, k1 // 2 : k1 // 2 + t1 * k1]
    tiles = region.reshape(n, t0, k0, t1, k1).transpose(0, 1, 3, 2, 4).reshape(n * t0 * t1, k0 * k1)
    # One bincount for every tile: offset each tile's bins into a range of its own.
    offsets = (np.arange(len(tiles), dtype=np.intp) * nb)[:, None]
    counts = np.bincount((tiles + offsets).ravel(), minlength=len(tiles) * nb).reshape(len(tiles), nb)
    return counts.astype(np.int16 if k0 * k1 + nb < 2**15 else np.int32)


def _clip_histograms(hist: np.ndarray, clim: int, pattern: np.ndarray, elements: int) -> np.ndarray:
    """scikit-image's ``clip_histogram`` on every row of ``hist`` (one tile of ``elements`` pixels
    each), in place."""
    nbins = hist.shape[1]
    # Every tile holds ``elements`` pixels, so the excess over the limit is that number less what the
    # clipped histogram keeps: one pass fewer than summing max(hist - clim, 0).
    np.minimum(hist, clim, out=hist)
    n_excess = elements - hist.sum(axis=1, dtype=np.int64)
    bin_incr = n_excess // nbins
    if bin_incr.any():  # with bin_incr 0 both steps change nothing (most tiles of a 64×64 image)
        upper = (clim - bin_incr)[:, None]
        low = hist < upper
        n_excess -= low.sum(axis=1) * bin_incr
        hist += (low * bin_incr[:, None]).astype(hist.dtype)
        mid = (hist >= upper) & (hist < clim)
        n_excess += np.where(mid, hist - clim, 0).sum(axis=1)
        hist[mid] = clim
    _redistribute(hist, n_excess, clim, pattern)
    return hist


def _redistribute(hist: np.ndarray, n_excess: np.ndarray, clim: int, pattern: np.ndarray) -> None:
    """The remaining-excess loop of scikit-image's ``clip_histogram``, for all tiles in lock-step.

    In scikit-image each tile makes passes over ``index = 0, 1, ...``: at each index it adds one count
    to every ``step``-th bin from ``index`` on that is under the limit, ``step`` being (bins under the
    limit) // (excess left), and stops as soon as the excess is spent (it may overshoot) or after a
    whole pass that placed nothing. All tiles start together, so every tile still going is at the same
    index: each step is one vectorised operation over those tiles.
    """
    nbins = hist.shape[1]
    first = 0  # where the first pass starts: after index 0 when that step was done on all tiles
    start_excess = n_excess.copy()
    if n_excess.size and n_excess.all():
        _first_step_everywhere(hist, n_excess, clim, pattern)
        first = 1
    active = np.flatnonzero(n_excess > 0)
    before = start_excess[active]
    while active.size:
        for index in range(first, nbins):
            h = hist[active]
            hit = h < clim
            step = np.maximum(1, hit.sum(axis=1) // n_excess[active])
            hit[:, :index] = False
            hit[:, index:] &= pattern[step, : nbins - index]  # bins index, index + step, ...
            hist[active] = h + hit
            n_excess[active] -= hit.sum(axis=1)
            left = n_excess[active] > 0
            active, before = active[left], before[left]
            if not active.size:
                return
        active = active[n_excess[active] != before]  # a pass that placed nothing ends that tile
        before, first = n_excess[active].copy(), 0


def _first_step_everywhere(hist: np.ndarray, n_excess: np.ndarray, clim: int, pattern: np.ndarray) -> None:
    """The ``index = 0`` step of :func:`_redistribute` when every tile has excess (the usual case for
    a 64×64 image: 64 pixels per tile, clipped at 1 count per bin), on ``hist`` itself: no gather
    of the active tiles and no scatter back."""
    hit = hist < clim
    step = np.maximum(1, hit.sum(axis=1) // n_excess)
    hit &= pattern[step]  # bins 0, step, 2 step, ...
    np.add(hist, hit, out=hist, casting="unsafe")
    n_excess -= hit.sum(axis=1)


@lru_cache(maxsize=16)
def _cumulative_to_level(elements: int, nbins: int) -> np.ndarray:
    """``map_histogram`` as a table over every possible cumulative count: the count times
    (2**14 - 1) / pixels per tile in float64, clipped to 2**14 - 1 and truncated."""
    scaled = np.arange(elements + nbins + 1, dtype=np.int64).astype(float)
    scaled *= (NR_OF_GRAY - 1) / elements
    np.clip(scaled, None, NR_OF_GRAY - 1, out=scaled)
    table = scaled.astype(int).astype(np.uint16)
    table.flags.writeable = False
    return table


def _interpolate(binned: np.ndarray, maps: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Bilinear blend of the four neighbouring tile mappings at every pixel, as uint16 levels.

    scikit-image blends the whole padded image and then crops it; only the image's own pixels are
    computed here, with its weights and its order (float64 products, summed in float32 from the
    up-left tile on), so the truncation to uint16 falls the same way.

    Args:
        binned: each pixel's bin, ``(N, H, W)``.
        maps: each tile's grey level for each bin, ``(N × tiles, nbins)``.
        geo: the shape's geometry.
    """
    n = len(binned)
    base = (np.arange(n, dtype=np.intp) * (geo.tiles[0] * geo.tiles[1] * geo.nbins))[:, None, None] + binned
    flat = maps.reshape(-1)
    # One edge at a time: stacking the four (float64) products was measured slower (memory traffic).
    result = (flat[base + geo.cells[0]] * geo.weights[0]).astype(np.float32)
    for e in (1, 2, 3):
        result += (flat[base + geo.cells[e]] * geo.weights[e]).astype(np.float32)
    return result.astype(np.uint16)


def _stretch_to_uint8(levels: np.ndarray) -> np.ndarray:
    """scikit-image's closing ``rescale_intensity`` (each image's min..max to 0..1 in float64), then the
    stored rounding."""
    f = levels.astype(np.float64)
    lo = f.min(axis=(1, 2), keepdims=True)
    span = f.max(axis=(1, 2), keepdims=True) - lo
    flat = span == 0
    return quantize(np.where(flat, np.clip(f, 0.0, 1.0), (f - lo) / np.where(flat, 1.0, span)))
