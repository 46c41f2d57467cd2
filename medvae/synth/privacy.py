"""The nearest-neighbour privacy filter: no synthetic image may be a near copy of a training image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _flat(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    # uint8 pairs stay on the 0..255 integer scale: every product and partial sum is then an integer far
    # below 2**53, so float64 BLAS computes squared distances *exactly* (an exact copy gives exactly 0,
    # which [0, 1]-scaled floats do not, whatever the summation order). Returns the value scale too.
    q, r = np.asarray(query), np.asarray(reference)
    if q.ndim < 2 or r.ndim < 2:
        raise ValueError(f"expected stacks of images (n, ...), got shapes {q.shape} and {r.shape}")
    scale = 255.0 if q.dtype == np.uint8 and r.dtype == np.uint8 else 1.0

    def flat(a: np.ndarray) -> np.ndarray:
        f = a.reshape(len(a), -1).astype(np.float64)
        return f / 255.0 if a.dtype == np.uint8 and scale == 1.0 else f

    return flat(q), flat(r), scale


def nearest_neighbour_distances(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> np.ndarray:
    """RMS pixel distance from each query image to its nearest reference image.

    Distance is the Euclidean distance of [0, 1] pixel vectors divided by sqrt(H·W), i.e. the
    root-mean-square pixel difference, so thresholds do not depend on image size. It is computed as
    ||a||² + ||b||² - 2ab in float64, chunk by chunk, on the integer 0..255 scale for uint8 input: there
    the arithmetic is exact, so cancellation cannot blur the small distances (near-copies) the privacy
    filter exists to catch, and an exact copy has distance exactly 0.

    Args:
        query: uint8 (n, H, W) (float in [0, 1] also accepted).
        reference: uint8 (m, H, W).
        exclude_self: query and reference are the same images; ignore each image's distance to itself
            (for train-to-train distances). Exact duplicates at other indices still count.
        chunk: query rows per matrix product (memory: chunk × m float64).

    Returns:
        Float64 array (n,); +inf where the reference is empty (or holds only the image itself).

    Raises:
        ValueError: for mismatched image shapes, or ``exclude_self`` with arrays of different lengths.
    """
    q, r, scale = _flat(query, reference)
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"query and reference images differ in size: {query.shape[1:]} vs {reference.shape[1:]}"
        )
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self needs query and reference to be the same images")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    out = np.full(len(q), np.inf)
    if len(q) == 0 or len(r) == 0:
        return out
    r_sq = np.einsum("ij,ij->i", r, r)
    for start in range(0, len(q), chunk):
        qc = q[start : start + chunk]
        d2 = np.einsum("ij,ij->i", qc, qc)[:, None] + r_sq[None, :] - 2.0 * (qc @ r.T)
        np.maximum(d2, 0.0, out=d2)  # cancellation can leave tiny negatives for (near-)identical images
        if exclude_self:
            rows = np.arange(len(qc))
            d2[rows, start + rows] = np.inf
        out[start : start + len(qc)] = d2.min(axis=1)
    return np.sqrt(out / q.shape[1]) / scale


def privacy_threshold(train: np.ndarray, quantile: float, max_reference: int = 5000, seed: int = 0) -> float:
    """The ``quantile`` of train-to-train nearest-neighbour distances: how close distinct real images get.

    A synthetic image closer to a training image than this is "closer than real patients are to each
    other" and is treated as a possible memorised copy.

    For speed, a training set larger than ``max_reference`` is subsampled (without replacement, seeded)
    and distances are taken within the subsample. A sparser set has larger nearest-neighbour distances,
    so subsampling can only raise the threshold: the filter gets stricter, never laxer.

    Exact duplicates inside the training set (distance 0) are left out of the quantile: they measure
    duplication in the data, not how close distinct images are, and would otherwise pull the threshold
    to 0 and let exact copies through.

    Args:
        train: uint8 training images (n, H, W), n >= 2.
        quantile: in [0, 1], e.g. ``AugmentConfig.privacy_quantile``.
        max_reference: the largest number of training images compared all-pairs.
        seed: seed of the subsample.

    Returns:
        The distance threshold (RMS pixel distance in [0, 1] units).

    Raises:
        ValueError: for a quantile outside [0, 1] or fewer than 2 training images.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    train = np.asarray(train)
    if len(train) < 2 or max_reference < 2:
        raise ValueError("privacy_threshold needs at least 2 training images (and max_reference >= 2)")
    if len(train) > max_reference:
        idx = np.random.default_rng(seed).choice(len(train), size=max_reference, replace=False)
        train = train[np.sort(idx)]
    d = nearest_neighbour_distances(train, train, exclude_self=True)
    d = d[d > 0.0]
    return float(np.quantile(d, quantile)) if d.size else 0.0


@dataclass(eq=False)
class FilterResult:
    """Outcome of :func:`privacy_filter`.

    Attributes:
        keep: bool (n,), True for samples that may be released.
        distances: float64 (n,), each sample's RMS distance to its nearest training image.
        threshold: the distance below which samples were rejected.
        rejection_rate: the share of samples rejected (0 for no samples).
    """

    keep: np.ndarray
    distances: np.ndarray
    threshold: float
    rejection_rate: float


def privacy_filter(samples: np.ndarray, train: np.ndarray, threshold: float) -> FilterResult:
    """Reject samples strictly closer than ``threshold`` to some training image (exact copies always).

    Args:
        samples: uint8 synthetic images (n, H, W).
        train: uint8 training images (m, H, W), all of them (the comparison is chunked).
        threshold: from :func:`privacy_threshold`.

    Returns:
        Which samples to keep, their distances and the rejection rate.
    """
    dist = nearest_neighbour_distances(samples, train)
    # d > 0 as well: an exact copy is never released, even under a threshold of 0.
    keep = (dist >= threshold) & (dist > 0.0)
    rate = float(1.0 - keep.mean()) if len(keep) else 0.0
    return FilterResult(keep=keep, distances=dist, threshold=float(threshold), rejection_rate=rate)
