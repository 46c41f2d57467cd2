"""Intensity windowing and geometric normalisation of decoded scans to a fixed square size."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from medvae.config import Intensity

# ITU-R BT.601 luma weights. They are also what a JPEG decoder uses for its Y channel, so an RGB
# JPEG decoded straight to greyscale (``Image.draft("L")``) and an RGB image reduced here agree.
BT601_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

# window() works in float32 only while both bounds are within this magnitude: then high - low, and its
# reciprocal, stay normal float32 numbers (max 3.4e38, smallest normal 1.2e-38).
_F32_SAFE_BOUND = 1e37


def window(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 1]`` and clip everything outside.

    Args:
        img: an array of any real dtype.
        low: the value that maps to 0 (black).
        high: the value that maps to 1 (white); must be greater than ``low``.

    Returns:
        A float32 array of the same shape with values in ``[0, 1]``; never NaN (NaN inputs map to 0).

    Raises:
        ValueError: when ``high <= low`` or either bound is not finite, because the mapping would
            divide by zero or silently produce NaN.
    """
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        raise ValueError(f"window needs finite bounds with high > low, got low={low}, high={high}")
    if max(abs(low), abs(high)) <= _F32_SAFE_BOUND:
        # float32 is plenty for a display window and halves the memory of large frames versus float64.
        # Values beyond float32's range overflow to ±inf here, which still clip to the right end.
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(img, dtype=np.float32) - np.float32(low)
            out *= np.float32(1.0 / (high - low))
        np.clip(out, 0.0, 1.0, out=out)
        # Integer pixels with bounds this small cannot produce NaN; only float input needs the extra pass.
        if not np.issubdtype(np.asarray(img).dtype, np.floating) or not np.isnan(out).any():
            return out
    # The rare cases float32 gets wrong: bounds beyond its ±3.4e38 (a forged RescaleSlope of 1e300, a
    # WindowCenter of 1e300), where low itself overflows to inf and every pixel then meets inf - inf or
    # inf * 0 (NaN) or a wrong clip, and NaN pixels in float input. Redo in float64 with every term
    # halved, so that high - low cannot overflow either, and send NaN to 0 (black), as percentile_window
    # does with non-finite values.
    x = np.clip(np.asarray(img, dtype=np.float64), low, high)
    out = ((x * 0.5 - low * 0.5) / (high * 0.5 - low * 0.5)).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)


def percentile_window(img: np.ndarray, pct: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Robust window between two percentiles of the image's own values.

    Used when nothing in the file says how to display it (a DICOM without VOI, a 16-bit PNG):
    percentiles instead of min/max keep a few hot pixels or burned-in markers from squashing
    the anatomy into a narrow grey band.

    When the two percentiles coincide (e.g. an image that is 99.5 % background) the window falls
    back to the full min..max range so a small object is not erased; a constant image has no
    contrast at all and becomes zeros. Non-finite values (NaN, ±inf in float data) are ignored
    when choosing the window and come out as 0.

    Args:
        img: an array of any real dtype.
        pct: low and high percentiles in ``[0, 100]``.

    Returns:
        A float32 array of the same shape with values in ``[0, 1]``; never NaN.

    Raises:
        ValueError: when the percentiles are not ordered within ``[0, 100]``.
    """
    lo_pct, hi_pct = pct
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {pct}")
    arr = np.asarray(img)
    finite: np.ndarray | None = None
    values = arr
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if finite.all():
            finite = None
        else:
            values = arr[finite]
    if values.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(values, [lo_pct, hi_pct]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(arr.shape, dtype=np.float32)
    out = window(arr, low, high)
    if finite is not None:
        out[~finite] = 0.0
    return out


def to_square(img: np.ndarray, policy: Literal["pad", "crop"]) -> np.ndarray:
    """Make the first two axes equal by padding the short side or centre-cropping the long side.

    ``pad`` keeps the whole field of view (nothing anatomical is lost; the padding is 0, i.e. black
    after windowing, and split evenly with the odd pixel at the bottom/right). ``crop`` keeps the
    centre square, losing the edges of the long side but none of the resolution.

    Args:
        img: an array of shape ``(rows, cols, ...)``.
        policy: ``"pad"`` or ``"crop"``.

    Returns:
        An array of shape ``(n, n, ...)`` where ``n`` is ``max(rows, cols)`` for pad and
        ``min(rows, cols)`` for crop; the input itself when it is already square.

    Raises:
        ValueError: for an unknown policy or an array with fewer than two axes.
    """
    if img.ndim < 2:
        raise ValueError(f"to_square needs at least 2 axes, got shape {img.shape}")
    rows, cols = img.shape[:2]
    if rows == cols:
        return img
    if policy == "pad":
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        out = np.zeros((side, side, *img.shape[2:]), dtype=img.dtype)
        out[top : top + rows, left : left + cols] = img
        return out
    if policy == "crop":
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        return img[top : top + side, left : left + side]
    raise ValueError(f"unknown aspect policy {policy!r}; expected 'pad' or 'crop'")


@lru_cache(maxsize=256)
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of exact area (pixel-mixing) weights along one axis.

    Output pixel ``i`` covers the input interval ``[i·n_in/n_out, (i+1)·n_in/n_out)``; its weight on
    input pixel ``j`` is the length of the overlap of that interval with ``[j, j+1)``, divided by the
    interval's length, so every row sums to 1. This is scikit-image's ``resize_local_mean`` with
    ``grid_mode=True`` (and OpenCV's ``INTER_AREA``), written out so the matrices can be cached per
    shape: a whole archive at one resolution reuses one pair.

    Args:
        n_in: the input length along the axis.
        n_out: the output length along the axis.

    Returns:
        A read-only float32 array of shape ``(n_out, n_in)``.
    """
    scale = n_in / n_out
    lo = np.arange(n_out, dtype=np.float64)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    w = (overlap / scale).astype(np.float32)
    w.flags.writeable = False
    return w


def resize_area(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image by exact area averaging (pixel mixing).

    Each output pixel is the exact mean of the input area it covers (OpenCV's ``INTER_AREA``,
    scikit-image's ``resize_local_mean``; the tests hold the two to float precision), so downsampling
    by any factor, integer or not, is anti-aliased (no moiré from the fine periodic structure of
    detector grids) and the image mean is preserved. Upsampling (a 3×3 image to 64×64) degrades
    gracefully into blocks with fractional blending at their edges.

    It is computed as two small matrix products with cached weights (:func:`area_weights`). That is
    what scikit-image does too, but importing ``skimage.transform`` pulls in scipy.ndimage, which cost
    every ingest worker 0.5 s at start-up, a sixth of a whole 5,000-file ingest on two cores. Under
    multi-threaded BLAS on an oversubscribed machine these products were measured 10–50× slower than
    single-threaded, which is why ingest workers pin BLAS to one thread (see ``medvae.data.ingest``).

    Args:
        img: a 2-D array of any real dtype.
        size: the output side length, or ``(rows, cols)``.

    Returns:
        A float32 array of shape ``(size, size)`` (or ``size`` when a tuple) in the input's value units.

    Raises:
        ValueError: when the input is not 2-D or empty, or the size is not positive.
    """
    shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(shape) < 1:
        raise ValueError(f"output size must be positive, got {size}")
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"resize_area expects a non-empty 2-D image, got shape {img.shape}")
    arr = np.asarray(img, dtype=np.float32)
    if arr.shape == shape:
        return np.array(arr, dtype=np.float32)  # a copy: callers may write into the result
    rows = area_weights(arr.shape[0], shape[0])
    cols = area_weights(arr.shape[1], shape[1])
    # Reduce the longer axis first: fewer multiply-adds for the second product.
    if arr.shape[0] >= arr.shape[1]:
        return np.ascontiguousarray((rows @ arr) @ cols.T, dtype=np.float32)
    return np.ascontiguousarray(rows @ (arr @ cols.T), dtype=np.float32)


def quantize(img01: np.ndarray) -> np.ndarray:
    """Round a ``[0, 1]`` float image to uint8 (0..255).

    uint8 is lossless enough for this pipeline: the image has already been windowed to its useful
    contrast range and area-downsampled to 64×64, so one step of 1/255 (0.4 % of the window) is below
    both the quantisation noise of the windowed source and what the VAE's reconstruction resolves,
    while a 64×64 image costs 4 KiB instead of 16 KiB as float32. Rounding (not flooring) keeps the
    error symmetric, at most half a step, and maps 1.0 to 255.

    Args:
        img01: a float array; values outside ``[0, 1]`` are clipped and NaN becomes 0.

    Returns:
        A uint8 array of the same shape.
    """
    out = np.array(img01, dtype=np.float32)  # a float32 copy, worked on in place
    out *= np.float32(255.0)
    # fmax/fmin rather than nan_to_num + clip: NaN becomes 0 and ±inf 255/0 in the same two passes, at
    # half the cost (this runs on every stored image, and again after CLAHE).
    np.fmax(out, np.float32(0.0), out=out)
    np.fmin(out, np.float32(255.0), out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def normalise(img01: np.ndarray, size: int = 64, policy: Literal["pad", "crop"] = "pad") -> np.ndarray:
    """Square, area-resize and quantise a windowed ``[0, 1]`` image: the stored form of a scan.

    Args:
        img01: a 2-D float image in ``[0, 1]`` (bright = dense).
        size: the output side length.
        policy: how a non-square image is made square, see :func:`to_square`.

    Returns:
        A uint8 array of shape ``(size, size)``.
    """
    return quantize(resize_area(to_square(img01, policy), size))


def standardise_intensity(img: np.ndarray, method: Intensity, clip_limit: float = 0.01) -> np.ndarray:
    """Per-image intensity standardisation of a normalised uint8 scan.

    Scans from different sites, detectors and exposures differ in global brightness and contrast far
    more than normal anatomy differs from normal anatomy. Standardising each image removes that nuisance
    variation before the VAE has to model it (docs/quality.md has the measured effect on anomaly
    screening). It runs on the 64×64 stored image, after resampling, so its cost does not grow with the
    source resolution.

    * ``clahe``: contrast-limited adaptive histogram equalisation, 8×8 tiles, ``clip_limit``: local
      contrast is stretched tile by tile, so lung texture and opacities fill the grey range whatever the
      exposure. Black padding stays black (the grey levels are rescaled from the image minimum). It is
      :func:`medvae.data.clahe.clahe_batch`, which gives exactly scikit-image's ``equalize_adapthist`` pixels.
    * ``equalize``: global histogram equalisation (scikit-image ``equalize_hist``).

    A blank image has no contrast to standardise and is returned unchanged (scikit-image would make it
    white).

    Args:
        img: a uint8 2-D image.
        method: ``"none"``, ``"clahe"`` or ``"equalize"``.
        clip_limit: CLAHE's clip limit (0..1; higher means more contrast).

    Returns:
        A uint8 image of the same shape (the input itself for ``"none"`` or a blank image).

    Raises:
        ValueError: for an unknown method.
    """
    _check_method(method)
    if method == "none" or int(img.max()) == int(img.min()):
        return img
    return standardise_batch(img[None], method, clip_limit)[0]


def standardise_batch(images: np.ndarray, method: Intensity, clip_limit: float = 0.01) -> np.ndarray:
    """:func:`standardise_intensity` over a uint8 ``(N, H, W)`` stack, vectorised for CLAHE.

    Args:
        images: uint8 images of one shape.
        method: ``"none"``, ``"clahe"`` or ``"equalize"``.
        clip_limit: CLAHE's clip limit.

    Returns:
        A uint8 ``(N, H, W)`` stack (the input itself for ``"none"``); blank images come back unchanged.

    Raises:
        ValueError: for an unknown method, or a stack that is not uint8 ``(N, H, W)``.
    """
    _check_method(method)
    if method == "none":
        return images
    if method == "clahe":
        from medvae.data.clahe import clahe_batch  # imported here: clahe imports quantize from this module

        return clahe_batch(images, clip_limit)
    # Imported here: only equalising ingests pay scikit-image's import (0.2 s per worker).
    from skimage import exposure

    out = np.array(images, dtype=np.uint8, copy=True)
    for i, img in enumerate(out):
        if int(img.max()) != int(img.min()):
            out[i] = quantize(exposure.equalize_hist(img, nbins=256))  # the rounding of every stored pixel
    return out


def _check_method(method: str) -> None:
    if method not in ("none", "clahe", "equalize"):
        raise ValueError(f"unknown intensity standardisation {method!r}; expected none, clahe or equalize")


def rgb_to_grey(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """BT.601 luminance of ``rgb / max_value``, in ``[0, 1]``; an image whose channels are all equal
    stays exact.

    Args:
        rgb: an ``(..., 3)`` (or RGBA) array of stored values.
        max_value: the largest value the samples can hold (255 for 8 bits).

    Returns:
        A float32 array without the last axis.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    scale = np.float32(1.0 / max_value)
    if np.array_equal(r, g) and np.array_equal(g, b):
        # Grey stored as RGB (common in exported X-rays): skip the weighted sum and its rounding.
        return np.asarray(r, dtype=np.float32) * scale
    return np.clip(luminance(rgb) * scale, 0.0, 1.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Reduce colour to grey with the ITU-R BT.601 luma weights (0.299, 0.587, 0.114).

    Args:
        rgb: a float (or integer) array whose last axis holds R, G, B and optionally alpha, which is
            ignored. Values are used as they are, so scale them first (e.g. to ``[0, 1]``).

    Returns:
        A float32 array without the last axis.

    Raises:
        ValueError: when the last axis does not have 3 or 4 channels.
    """
    arr = np.asarray(rgb)
    if arr.ndim < 1 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"luminance expects a last axis of 3 (RGB) or 4 (RGBA) channels, got {arr.shape}")
    # Channel by channel rather than a dot product: same result, no float64 temporaries for big images.
    r, g, b = (arr[..., i].astype(np.float32, copy=False) for i in range(3))
    out = r * np.float32(BT601_WEIGHTS[0])
    out += g * np.float32(BT601_WEIGHTS[1])
    out += b * np.float32(BT601_WEIGHTS[2])
    return out
