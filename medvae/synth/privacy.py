"""The nearest-neighbour privacy filter: no synthetic image may be a near copy of a training image.

"Near" is measured by :func:`tolerant_nearest`: the RMS pixel distance over the image's central crop,
minimised over integer shifts of up to ``max_shift`` pixels and the horizontal flip, so a copy that was
shifted, flipped or JPEG re-encoded is as near as the copy itself. The threshold
(:func:`threshold_report`) is a low quantile of train-to-train distances with near-duplicate pairs
left out and a floor under it, so duplicates inside the training set cannot pull it down.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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


MAX_SHIFT = 4  # pixels; a planted copy shifted by up to this much is still "the same image"
# Both constants are RMS distances in [0, 1] units, measured on Kermany training images at 64x64 with
# CLAHE (benchmarks/privacy_filter.py; its module docs hold the figures): disguised copies are within
# 0.030 of their source (tolerant), distinct patients' nearest images no nearer than 0.114 (tolerant)
# and 0.135 (plain).
DUPLICATE_DISTANCE = 0.06  # below this, two training images are copies of one scan, not two patients
MIN_THRESHOLD = 0.08  # the threshold never drops below this, whatever the training set holds
_BASIS = 8  # 8x8 separable DCT functions give the lower bound that prunes the exact search
_CHUNK_ELEMENTS = 1 << 23  # bound on query-chunk x reference x group floats (64 MiB of float64)
_REF_BLOCK = 1024  # references whose window features are held at once (85 MB of float64)


def _dct_rows(n: int, k: int) -> np.ndarray:
    # The first k orthonormal DCT-II basis vectors of length n: (k, n).
    x = (np.arange(n) + 0.5) * np.pi / n
    rows = np.cos(np.outer(np.arange(k), x))
    rows[0] /= np.sqrt(2.0)
    return rows * np.sqrt(2.0 / n)


@dataclass(frozen=True, eq=False)
class _Geometry:
    """Crop and transform bookkeeping of one tolerant search."""

    shift: int
    flips: int
    crop: tuple[int, int]
    ky: np.ndarray  # (k, crop rows) DCT rows
    kx: np.ndarray  # (k, crop cols)

    @property
    def side(self) -> int:
        return 2 * self.shift + 1

    def groups(self) -> list[np.ndarray]:
        # Transforms (flip, oy, ox), flattened, in blocks of up to 3x3 neighbouring offsets: the
        # lower bound first looks at each block's centre and radius, then at its members.
        s, out = self.side, []
        blocks = [np.arange(a, min(a + 3, s)) for a in range(0, s, 3)]
        for f in range(self.flips):
            for by in blocks:
                for bx in blocks:
                    out.append((f * s * s + by[:, None] * s + bx[None, :]).ravel())
        return out

    def decode(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.side
        return t // (s * s), (t // s) % s, t % s


def _geometry(shape: tuple[int, ...], max_shift: int, flip: bool) -> _Geometry:
    h, w = shape
    if max_shift < 0 or min(h, w) <= 2 * max_shift:
        raise ValueError(f"max_shift must be >= 0 and leave a central crop of {h}x{w} images")
    crop = (h - 2 * max_shift, w - 2 * max_shift)
    k = min(_BASIS, *crop)
    return _Geometry(max_shift, 2 if flip else 1, crop, _dct_rows(crop[0], k), _dct_rows(crop[1], k))


def _window_features(images: np.ndarray, g: _Geometry) -> np.ndarray:
    """DCT coefficients of every shifted (and flipped) crop window: float64 (m, T, k*k).

    The DCT rows are orthonormal, so the distance between coefficient vectors never exceeds the pixel
    distance of the windows: a valid lower bound. Separable: rows first, then columns.
    """
    t_per_flip = g.side * g.side
    res = np.empty((len(images), g.flips * t_per_flip, g.ky.shape[0] * g.kx.shape[0]))
    for f in range(g.flips):
        imgs = images[:, :, ::-1] if f else images
        for start in range(0, len(imgs), 256):
            x = imgs[start : start + 256].astype(np.float64)
            wy = sliding_window_view(x, g.crop[0], axis=1)  # (m, side, W, crop rows)
            a = wy @ g.ky.T  # (m, side, W, k)
            wx = sliding_window_view(a, g.crop[1], axis=2)  # (m, side, side, k, crop cols)
            feats = wx @ g.kx.T  # (m, side, side, k, k)
            res[start : start + len(x), f * t_per_flip : (f + 1) * t_per_flip] = feats.reshape(
                len(x), t_per_flip, -1
            )
    return res


def _query_features(query: np.ndarray, g: _Geometry) -> np.ndarray:
    s, (h, w) = g.shift, g.crop
    c = query[:, s : s + h, s : s + w].astype(np.float64)
    return np.einsum("iy,nyx,jx->nij", g.ky, c, g.kx).reshape(len(query), -1)


def _exact_d2(
    query: np.ndarray, reference: np.ndarray, g: _Geometry, qi: np.ndarray, rj: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """Exact squared distances (integer, uint8 units) of query crops to the named reference windows."""
    s, (h, w) = g.shift, g.crop
    f, oy, ox = g.decode(t)
    out = np.empty(len(qi), dtype=np.int64)
    views = [
        sliding_window_view(reference[:, :, ::-1] if k else reference, (h, w), axis=(1, 2))
        for k in range(g.flips)
    ]
    for start in range(0, len(qi), 2048):
        sl = slice(start, start + 2048)
        win = np.empty((len(qi[sl]), h, w), dtype=np.uint8)
        for k in range(g.flips):
            m = f[sl] == k
            win[m] = views[k][rj[sl][m], oy[sl][m], ox[sl][m]]
        diff = query[qi[sl], s : s + h, s : s + w].astype(np.int32) - win
        out[sl] = np.einsum("nij,nij->n", diff, diff, dtype=np.int64)
    return out


@dataclass(eq=False)
class Nearest:
    """Outcome of :func:`tolerant_nearest`.

    Attributes:
        distances: float64 (n,): the tolerant distance to the nearest reference image, exact where it is
            below ``cap``; elsewhere an upper bound that is itself >= ``cap`` (+inf without references).
        index: int64 (n,): the reference image at that distance (-1 without one).
        flipped: bool (n,): whether that reference was flipped horizontally.
        shift: int64 (n, 2): the (dy, dx) by which the query is that reference shifted.
    """

    distances: np.ndarray
    index: np.ndarray
    flipped: np.ndarray
    shift: np.ndarray


def _check_tolerant(query: np.ndarray, reference: np.ndarray, exclude_self: bool) -> None:
    if query.dtype != np.uint8 or reference.dtype != np.uint8 or query.ndim != 3 or reference.ndim != 3:
        raise ValueError(
            f"expected uint8 stacks (n, H, W), got {query.dtype} {query.shape} and {reference.dtype} "
            f"{reference.shape}"
        )
    if query.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"query and reference images differ in size: {query.shape[1:]} vs {reference.shape[1:]}"
        )
    if exclude_self and len(query) != len(reference):
        raise ValueError("exclude_self needs query and reference to be the same images")


@dataclass(eq=False)
class _Index:
    """The reference side of a tolerant search: window features, group centres and radii."""

    g: _Geometry
    feats: np.ndarray  # (m, T, K)
    centres: np.ndarray  # (m * G, K)
    centre_sq: np.ndarray  # (m * G,)
    radius: np.ndarray  # (m * G,)
    members: np.ndarray  # (G, M) transform indices of each group (short groups padded by repetition)


def _index(reference: np.ndarray, g: _Geometry) -> _Index:
    feats = _window_features(reference, g)
    groups = g.groups()
    width = max(len(x) for x in groups)
    members = np.stack([np.pad(x, (0, width - len(x)), mode="edge") for x in groups])
    centres = np.stack([feats[:, x].mean(axis=1) for x in groups], axis=1)  # (m, G, K)
    radius = np.stack(
        [
            np.linalg.norm(feats[:, x] - centres[:, k : k + 1], axis=-1).max(axis=1)
            for k, x in enumerate(groups)
        ],
        axis=1,
    )
    flat = centres.reshape(-1, centres.shape[-1])
    return _Index(g, feats, flat, np.einsum("ij,ij->i", flat, flat), radius.ravel(), members)


def _member_bounds(
    pq: np.ndarray, ix: _Index, ci: np.ndarray, j: np.ndarray, gi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    # Per-transform lower bounds (norm units) of candidate (query, reference, group) triples: (n, M).
    t = ix.members[gi]
    diff = pq[ci][:, None, :] - ix.feats[j[:, None], t]
    lb = np.sqrt(np.einsum("nmk,nmk->nm", diff, diff)) - 1e-6 * (1.0 + np.abs(pq[ci]).sum(1))[:, None]
    return lb, t


def _search_chunk(
    q: np.ndarray,
    r: np.ndarray,
    r0: int,
    pq: np.ndarray,
    ix: _Index,
    qi: np.ndarray,
    cap2: float,
    exclude_self: bool,
    best: np.ndarray,
    best_j: np.ndarray,
    best_t: np.ndarray,
) -> None:
    """Exact tolerant nearest neighbours of queries ``qi`` among references ``r`` (global indices from
    ``r0``) below ``cap2`` (squared, uint8 units), merged into ``best``/``best_j``/``best_t`` in place."""
    m, n_groups = len(r), ix.members.shape[0]
    p = pq[qi]
    p_sq = np.einsum("ij,ij->i", p, p)
    d2 = np.maximum(p_sq[:, None] + ix.centre_sq[None] - 2.0 * (p @ ix.centres.T), 0.0)
    # Float rounding must never make a bound exceed the true distance: subtract a generous margin.
    lb = np.sqrt(d2) - ix.radius[None] - 1e-6 * (1.0 + np.sqrt(p_sq)[:, None] + np.sqrt(ix.centre_sq)[None])
    lb = lb.reshape(len(qi), m, n_groups)
    if exclude_self:
        own = (qi >= r0) & (qi < r0 + m)
        lb[np.flatnonzero(own), qi[own] - r0, :] = np.inf
    # Seed: the exact distance at the best-bounded transform of the best-bounded group: an upper bound.
    flat = lb.reshape(len(qi), -1)
    j0, g0 = np.divmod(flat.argmin(axis=1), n_groups)
    ok = np.isfinite(flat[np.arange(len(qi)), flat.argmin(axis=1)])  # not only the image itself
    mb, t = _member_bounds(pq, ix, qi[ok], j0[ok], g0[ok])
    t0 = t[np.arange(len(t)), mb.argmin(axis=1)]
    seed = _exact_d2(q, r, ix.g, qi[ok], j0[ok], t0).astype(np.float64)
    _update(best, best_j, best_t, qi[ok], j0[ok] + r0, t0, seed)
    limit = np.sqrt(np.minimum(best[qi], cap2))
    ci, j, gi = np.nonzero((lb <= limit[:, None, None]) & np.isfinite(lb))  # inf: the image itself
    for start in range(0, len(ci), 4096):
        sl = slice(start, start + 4096)
        mb, t = _member_bounds(pq, ix, qi[ci[sl]], j[sl], gi[sl])
        rows, cols = np.nonzero(mb <= limit[ci[sl]][:, None])
        if len(rows):
            qq, jj, tt = qi[ci[sl]][rows], j[sl][rows], t[rows, cols]
            d2_exact = _exact_d2(q, r, ix.g, qq, jj, tt).astype(np.float64)
            _update(best, best_j, best_t, qq, jj + r0, tt, d2_exact)


def _update(
    best: np.ndarray,
    best_j: np.ndarray,
    best_t: np.ndarray,
    qi: np.ndarray,
    j: np.ndarray,
    t: np.ndarray,
    d2: np.ndarray,
) -> None:
    np.minimum.at(best, qi, d2)
    hit = d2 == best[qi]
    best_j[qi[hit]] = j[hit]
    best_t[qi[hit]] = t[hit]


def tolerant_nearest(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    cap: float = math.inf,
    max_shift: int = MAX_SHIFT,
    flip: bool = True,
    exclude_self: bool = False,
) -> Nearest:
    """Shift- and flip-tolerant RMS distance from each query image to its nearest reference image.

    The distance of query a to reference b is the minimum, over integer shifts (dy, dx) with
    ``|dy|, |dx| <= max_shift`` and over b and its horizontal mirror, of the RMS difference between a's
    central crop (``max_shift`` pixels off each edge) and the equally large window of b shifted by
    (dy, dx). A copy of b shifted by up to ``max_shift`` pixels (whatever fills its border) or flipped
    is at distance exactly 0; a re-encoded one is as near as re-encoding made it.

    It is exact on the integer uint8 scale, like :func:`nearest_neighbour_distances`, and fast: an
    orthonormal 8x8 DCT projection of every window gives lower bounds (first per block of 3x3 shifts,
    by centre and radius, then per shift), and only the (query, reference, shift) triples whose bound
    is below ``cap`` (and below the best distance found so far) are compared pixel by pixel. Memory is
    bounded (about 200 MB at the defaults, whatever n and m): references go in blocks of 1024 whose
    window features (T = 2 (2 max_shift + 1)^2 windows x 64 coefficients each) are held at once, and
    queries go in chunks.

    Args:
        query: uint8 (n, H, W).
        reference: uint8 (m, H, W).
        cap: distances below this are exact; a larger one is reported as an upper bound >= cap. The
            default (+inf) makes every distance exact, at a higher cost.
        max_shift: the largest shift tolerated, in pixels.
        flip: also compare with the horizontally mirrored references.
        exclude_self: query and reference are the same images; skip each image's own index (for
            train-to-train distances); copies at other indices still count.

    Returns:
        The distances (RMS in [0, 1] units), the nearest reference, its flip and shift.

    Raises:
        ValueError: for non-uint8 or mismatched stacks, a shift that leaves no crop, or ``exclude_self``
            with arrays of different lengths.
    """
    q, r = np.asarray(query), np.asarray(reference)
    _check_tolerant(q, r, exclude_self)
    n = len(q)
    best = np.full(n, np.inf)
    best_j = np.full(n, -1, dtype=np.int64)
    best_t = np.zeros(n, dtype=np.int64)
    g = _geometry(q.shape[1:], max_shift, flip)
    npix = g.crop[0] * g.crop[1]
    pq = _query_features(q, g) if n else np.zeros((0, 0))
    cap2 = (cap * 255.0) ** 2 * npix if math.isfinite(cap) else math.inf
    # References in blocks, so memory stays bounded whatever the training set's size.
    for r0 in range(0, len(r) if n else 0, _REF_BLOCK):
        block = r[r0 : r0 + _REF_BLOCK]
        ix = _index(block, g)
        chunk = max(1, _CHUNK_ELEMENTS // (len(block) * ix.members.shape[0]))
        for start in range(0, n, chunk):
            qi = np.arange(start, min(n, start + chunk))
            _search_chunk(q, block, r0, pq, ix, qi, cap2, exclude_self, best, best_j, best_t)
    f, oy, ox = g.decode(best_t)
    shift = np.stack([g.shift - oy, g.shift - ox], axis=1) * (best_j[:, None] >= 0)
    return Nearest(np.sqrt(best / npix) / 255.0, best_j, (f == 1) & (best_j >= 0), shift)


@dataclass(eq=False)
class ThresholdReport:
    """How :func:`threshold_report` arrived at its threshold.

    Attributes:
        threshold: ``max(floor, quantile_value)``: the distance below which a sample is too close.
        quantile_value: the quantile of the distinct images' nearest-neighbour distances (nan if none).
        floor: the minimum threshold.
        near_duplicates: reference images left out because another one is a near copy of them.
        n_reference: images compared (after subsampling).
    """

    threshold: float
    quantile_value: float
    floor: float
    near_duplicates: int
    n_reference: int


def threshold_report(
    train: np.ndarray,
    quantile: float,
    max_reference: int = 5000,
    seed: int = 0,
    *,
    floor: float = MIN_THRESHOLD,
    duplicate_distance: float = DUPLICATE_DISTANCE,
) -> ThresholdReport:
    """The ``quantile`` of train-to-train nearest-neighbour distances, robust to duplicates, with a floor.

    A synthetic image closer to a training image than distinct real images get to each other is a
    possible memorised copy. Near-duplicates inside the training set (the same scan re-encoded, exact
    copies: different bytes, so de-duplication keeps both) measure duplication, not how close distinct
    patients get: 20 re-encodes among 1300 Kermany images pulled the 1 % quantile from 0.136 to 0.014,
    below the re-encodes' own distance to their source (0.016-0.029), so they passed. Every image whose
    nearest neighbour is closer than ``duplicate_distance`` is therefore left out of the quantile, and
    the result never drops below ``floor`` (both measured on real data; see the module constants).

    A training set larger than ``max_reference`` is subsampled (without replacement, seeded); a sparser
    set has larger nearest-neighbour distances, so subsampling can only make the filter stricter.

    Args:
        train: uint8 training images (n, H, W), n >= 2.
        quantile: in [0, 1], e.g. ``AugmentConfig.privacy_quantile``.
        max_reference: the largest number of training images compared all-pairs.
        seed: seed of the subsample.
        floor: the minimum threshold.
        duplicate_distance: nearest-neighbour distances below this are near-duplicates.

    Returns:
        The threshold (RMS pixel distance in [0, 1] units) and how it was found.

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
    dup = d < duplicate_distance
    q = float(np.quantile(d[~dup], quantile)) if (~dup).any() else float("nan")
    thr = floor if math.isnan(q) else max(floor, q)
    return ThresholdReport(float(thr), q, float(floor), int(dup.sum()), len(train))


def privacy_threshold(
    train: np.ndarray,
    quantile: float,
    max_reference: int = 5000,
    seed: int = 0,
    *,
    floor: float = MIN_THRESHOLD,
    duplicate_distance: float = DUPLICATE_DISTANCE,
) -> float:
    """:func:`threshold_report`'s threshold alone."""
    return threshold_report(
        train, quantile, max_reference, seed, floor=floor, duplicate_distance=duplicate_distance
    ).threshold


@dataclass(eq=False)
class FilterResult:
    """Outcome of :func:`privacy_filter`.

    Attributes:
        keep: bool (n,), True for samples that may be released.
        distances: float64 (n,), each sample's plain RMS distance to its nearest training image.
        threshold: the plain distance below which samples were rejected.
        rejection_rate: the share of samples rejected (0 for no samples).
        copy_distances: float64 (n,), the shift/flip-tolerant distance (:func:`tolerant_nearest`), exact
            below ``copy_threshold`` and an upper bound >= it elsewhere.
        copy_threshold: the tolerant distance below which samples were rejected as copies.
        nearest: int64 (n,), the training image at the tolerant distance.
    """

    keep: np.ndarray
    distances: np.ndarray
    threshold: float
    rejection_rate: float
    copy_distances: np.ndarray
    copy_threshold: float
    nearest: np.ndarray


def privacy_filter(
    samples: np.ndarray,
    train: np.ndarray,
    threshold: float,
    *,
    copy_threshold: float = MIN_THRESHOLD,
    max_shift: int = MAX_SHIFT,
    flip: bool = True,
) -> FilterResult:
    """Reject samples too close to a training image, in either of two senses (exact copies always).

    * Closer than distinct real images are (plain RMS distance below ``threshold``, from
      :func:`threshold_report`): the memorisation criterion.
    * A copy that was shifted by up to ``max_shift`` pixels, mirrored or re-encoded (tolerant distance
      below ``copy_threshold``): such a copy is far in plain distance (a 2-pixel shift is at 0.19) and
      would pass the first check.

    Args:
        samples: uint8 synthetic images (n, H, W).
        train: uint8 training images (m, H, W), all of them (the comparison is chunked).
        threshold: from :func:`privacy_threshold`.
        copy_threshold: the tolerant-distance threshold (default: the measured floor).
        max_shift: the largest shift tolerated, in pixels.
        flip: also catch horizontally mirrored copies.

    Returns:
        Which samples to keep, both distances, the thresholds and the rejection rate.
    """
    samples, train = np.asarray(samples), np.asarray(train)
    dist = nearest_neighbour_distances(samples, train)
    tol = tolerant_nearest(samples, train, cap=copy_threshold, max_shift=max_shift, flip=flip)
    # > 0 as well: an exact copy (of any kind) is never released, even under thresholds of 0.
    keep = (dist >= threshold) & (tol.distances >= copy_threshold) & (tol.distances > 0.0)
    rate = float(1.0 - keep.mean()) if len(keep) else 0.0
    return FilterResult(keep, dist, float(threshold), rate, tol.distances, float(copy_threshold), tol.index)


PLANT_KINDS = ("exact", "jpeg", "shift", "flip", "flip_shift_jpeg")


def jpeg_reencode(image: np.ndarray, quality: int) -> np.ndarray:
    """A uint8 (H, W) image encoded as a JPEG of ``quality`` and decoded again (what a re-export does)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved down by ``dy`` and right by ``dx`` pixels; the uncovered border repeats the edge."""
    p = max(abs(dy), abs(dx))
    padded = np.pad(image, p, mode="edge")
    h, w = image.shape
    return padded[p - dy : p - dy + h, p - dx : p - dx + w].copy()


@dataclass(eq=False)
class Planted:
    """Copies of training images made to test the filter: ``images[k]`` is a ``kinds[k]`` of ``source[k]``."""

    images: np.ndarray
    kinds: np.ndarray
    source: np.ndarray


def plant_copies(train: np.ndarray, n: int, *, seed: int = 0, max_shift: int = MAX_SHIFT) -> Planted:
    """``n`` disguised copies of random training images, the kinds of :data:`PLANT_KINDS` in turn.

    Exact copies; JPEG re-encodes (quality 75-95); shifts by up to ``max_shift`` pixels in each axis
    (never 0, 0); horizontal mirrors; and mirrored, shifted, re-encoded copies.
    """
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(train), size=n)
    kinds = np.array([PLANT_KINDS[k % len(PLANT_KINDS)] for k in range(n)])
    out = np.empty((n, *train.shape[1:]), dtype=np.uint8)
    for k, (j, kind) in enumerate(zip(src, kinds, strict=True)):
        img = train[j]
        if "flip" in kind:
            img = img[:, ::-1]
        if "shift" in kind:
            dy, dx = 0, 0
            while dy == 0 and dx == 0:
                dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
            img = shifted(img, dy, dx)
        if "jpeg" in kind:
            img = jpeg_reencode(img, int(rng.integers(75, 96)))
        out[k] = img
    return Planted(out, kinds, src)


def catch_rate(
    samples: np.ndarray,
    train: np.ndarray,
    *,
    quantile: float = 0.01,
    n_planted: int = 200,
    train_duplicates: int = 0,
    seed: int = 0,
    max_shift: int = MAX_SHIFT,
) -> dict[str, object]:
    """Measure the filter on planted copies: how many it catches, and what it does to real samples.

    Copies from :func:`plant_copies` are mixed into ``samples`` and the whole set is filtered against
    the training set, with the threshold computed from it as the pipeline does. With
    ``train_duplicates`` > 0, JPEG re-encodes of that many training images are added to the training set
    first (bytes differ, so de-duplication keeps both): the near-duplicates that used to disarm the
    threshold.

    Returns:
        ``threshold``, ``threshold_quantile_value``, ``near_duplicates`` (left out of the quantile),
        ``caught`` (share of planted copies rejected, per kind and ``"all"``), ``false_negative_rate``
        (share released), ``sample_rejection_rate`` (share of ``samples`` rejected) and the counts.
    """
    rng = np.random.default_rng(seed + 1)
    train = np.asarray(train)
    if train_duplicates:
        pick = rng.choice(len(train), size=min(train_duplicates, len(train)), replace=False)
        dups = np.stack([jpeg_reencode(train[j], int(rng.integers(75, 96))) for j in pick])
        train = np.concatenate([train, dups])
    report = threshold_report(train, quantile, seed=seed)
    planted = plant_copies(train, n_planted, seed=seed, max_shift=max_shift)
    res = privacy_filter(
        np.concatenate([samples, planted.images]), train, report.threshold, max_shift=max_shift
    )
    caught = ~res.keep[len(samples) :]
    by_kind = {k: float(caught[planted.kinds == k].mean()) for k in PLANT_KINDS if (planted.kinds == k).any()}
    return {
        "threshold": report.threshold,
        "threshold_quantile_value": report.quantile_value,
        "near_duplicates": report.near_duplicates,
        "caught": {**by_kind, "all": float(caught.mean()) if len(caught) else 1.0},
        "false_negative_rate": float(1.0 - caught.mean()) if len(caught) else 0.0,
        "sample_rejection_rate": float((~res.keep[: len(samples)]).mean()) if len(samples) else 0.0,
        "n_samples": len(samples),
        "n_planted": n_planted,
        "n_train": len(train),
    }
