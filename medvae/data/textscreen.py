"""A cheap screen for burned-in text in the border bands of a decoded image, and optional OCR.

Scrubbing the header does nothing for text written into the pixels: ultrasound and screen captures,
scanned films and many radiographs carry the patient's name, ID or birth date burned in, and such
text stays legible even in a 64×64 thumbnail when it is large enough. ``BurnedInAnnotation`` is
optional and often absent or wrong, so the pixels themselves are looked at.

**What is looked for.** Overlay text sits in the top and bottom bands of the image (the corners
included) and is drawn in lines: several marks of similar height, side by side on one baseline,
each a thin bright (or dark) stroke pattern against its surroundings. So each band is
morphologically top-hat filtered (strokes narrower than a glyph survive, anatomy and background do
not), thresholded, split into connected components, and components of glyph size and shape are
chained left to right into lines. A line of ``min_marks`` (5) or more is reported. Single markers
(``R``, ``L``) and short codes (``KV68``) do not make a line; ribs and wires are too long or too
irregular to chain.

**At what size.** Only text legible in the *stored* image matters, so the smallest glyph searched
for is ``min_text_px`` pixels of the stored image (3 by default: 3-pixel digits can still be read),
converted to pixels of the decoded image, up to four times that; a large image is block-averaged
down first, so the cost stays about a millisecond whatever the image size, and a quarter of that per
image when an ingest screens a whole decode batch at once (:func:`find_text_batch`).

**How good.** Measured with ``benchmarks/burned_in_text.py`` (figures in its docstring): on the 5,216
Kermany training radiographs, which carry small markers and timestamps but no legible names, the
screen flags few; it catches most lines of patient-like text drawn with Pillow at 3-8 stored pixels.
It is a screen, not a guarantee: text inside the anatomy, vertical text or a single short word is
not looked for. Optional OCR (:func:`ocr_words`, Debian's ``tesseract``) is a second opinion.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["TextFinding", "find_text", "find_text_batch", "ocr_words"]

# The share of the image height screened at the top and at the bottom.
BAND = 0.2
# Marks in one line before it counts as text: a marker letter or a 4-character code is not a line.
MIN_MARKS = 5
# Separate components in such a line, however many letters the touching ones among them span.
MIN_BOXES = 4
# Top-hat contrast (of the [0, 1] image) a stroke must have over its surroundings.
CONTRAST = 0.12
# The smallest glyph height searched for in the decoded image, whatever the stored size.
_MIN_GLYPH_PX = 5.0
# Glyph height, in working pixels, of the smallest glyphs: larger images are block-averaged down to it.
_WORK_HEIGHT = 8.0
# Glyphs from the smallest height searched for up to this many times it: 2.25 to 9 stored pixels by
# default, i.e. up to 14% of the image height, most of a band. Searching for taller glyphs flagged bone
# and soft tissue of the neck as "text" on one Kermany image in eight, and such text is rare.
_HEIGHT_RANGE = 5.0


@dataclass(frozen=True)
class TextFinding:
    """A line of text-like marks: where, how many marks, and how tall at the stored size."""

    band: str
    marks: int
    stored_px: float

    def describe(self) -> str:
        """A reason fragment that says what was seen, never what it reads."""
        return (
            f"a line of {self.marks} character-like marks in the {self.band} band, "
            f"about {self.stored_px:.0f} px tall at the stored size"
        )


def find_text(pixels: np.ndarray, stored_size: int, min_text_px: float = 3.0) -> TextFinding | None:
    """Look for a line of burned-in text in the top and bottom bands of an image.

    Args:
        pixels: the decoded image, float in ``[0, 1]``, 2-D, at the decoded resolution.
        stored_size: the side of the stored image (``IngestConfig.size``).
        min_text_px: the smallest glyph height to look for, in pixels of the stored image.

    Returns:
        The longest line found (in marks), or None when there is none.
    """
    return find_text_batch([pixels], stored_size, min_text_px)[0]


def find_text_batch(
    images: Sequence[np.ndarray], stored_size: int, min_text_px: float = 3.0
) -> list[TextFinding | None]:
    """:func:`find_text` of many images at once: the same findings, a fraction of the cost.

    On the small images an ingest decodes (a 224 px JPEG is decoded at 112 px) each filter call works
    on a few thousand pixels, so the per-call overhead of the filters, the labelling and the median
    outweighed the work itself. Images of one shape are screened together: their bands are stacked
    and every step runs once over the stack (connected components never join across images).

    Args:
        images: decoded images, float in ``[0, 1]``, each 2-D at its decoded resolution.
        stored_size: the side of the stored image (``IngestConfig.size``).
        min_text_px: the smallest glyph height to look for, in pixels of the stored image.

    Returns:
        One finding (or None) per image, in order.
    """
    arrays = [np.asarray(p, dtype=np.float32) for p in images]
    out: list[TextFinding | None] = [None] * len(arrays)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(arrays):
        if img.ndim == 2 and min(img.shape) >= 8:
            groups.setdefault((img.shape[0], img.shape[1]), []).append(i)
    for shape, members in groups.items():
        found = _screen_shape([arrays[i] for i in members], shape, stored_size, min_text_px)
        for i, finding in zip(members, found, strict=True):
            out[i] = finding
    return out


def _screen_shape(
    images: list[np.ndarray], shape: tuple[int, int], stored_size: int, min_text_px: float
) -> list[TextFinding | None]:
    """:func:`find_text_batch` of images of one shape."""
    per_stored = max(shape) / float(stored_size)  # decoded pixels per stored pixel
    # Glyph boxes of digits and capitals are about the nominal height; accept a quarter less. Below five
    # decoded pixels a "glyph" cannot be told from noise (speckle in a small MR), and it is not legible.
    smallest = max(_MIN_GLYPH_PX, 0.75 * min_text_px * per_stored)
    factor = max(1, int(smallest // _WORK_HEIGHT))
    n_band = max(4, round(shape[0] * BAND))
    n = len(images)
    # Slices in the order (image, band, polarity): top bright, top dark, bottom bright, bottom dark. Each
    # image's bands are reduced before stacking, so that a batch of 64 large DICOMs never stacks whole
    # images (a 3000 px CR reduces 13-fold on each side here).
    bands = np.concatenate([_block_mean(np.stack([img[:n_band], img[-n_band:]]), factor) for img in images])
    lines = _longest_lines(bands, smallest / factor)
    found: list[TextFinding | None] = []
    for i in range(n):
        best: TextFinding | None = None
        for b, band in enumerate(("top", "bottom")):
            marks, height = lines[2 * i + b]
            if marks >= MIN_MARKS and (best is None or marks > best.marks):
                best = TextFinding(band, marks, height * factor / per_stored)
        found.append(best)
    return found


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """``(N, H, W)`` images reduced by ``factor`` in each direction by block averaging (an anti-aliased
    shrink)."""
    if factor == 1:
        return img
    n, h, w = img.shape[0], (img.shape[1] // factor) * factor, (img.shape[2] // factor) * factor
    blocks = img[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _longest_lines(bands: np.ndarray, lo: float) -> list[tuple[int, float]]:
    """For each ``(H, W)`` band of the stack: the most glyph-like marks on one line, bright or dark, and
    their median height."""
    k = max(3, round(lo) | 1)  # wider than the strokes of all glyphs searched for (bold ones too)
    if min(bands.shape[1:]) < k + 2:
        return [(0, 0.0)] * len(bands)
    # uint8: the min/max filters run about twice as fast as on float32, and 1/255 is fine enough here.
    grey = np.clip(bands * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # Each band twice: as it is (bright text) and inverted (dark text); slice 2j + p is band j, polarity p.
    polar = np.stack([grey, 255 - grey], 1).reshape(2 * len(bands), *grey.shape[1:])
    # White top-hat: what an opening wider than the strokes removes (on the inverted band, dark text).
    # (minimum then maximum filter is grey_opening without its per-call set-up; size 1 along the stack
    # axis keeps every slice to itself)
    tophat = polar - _flat_filter(_flat_filter(polar, k, np.minimum), k, np.maximum)
    # Strokes must also stand out from the band's own texture: speckle (ultrasound, a small MR) has a
    # high top-hat everywhere, and typed text is far brighter than that texture.
    cut = _texture_cut(tophat, round(CONTRAST * 255))
    boxes = _glyph_boxes(tophat > cut[:, None, None], lo, _HEIGHT_RANGE * lo)
    best: list[tuple[int, float]] = []
    for j in range(len(bands)):
        top: tuple[int, float] = (0, 0.0)
        for p in (0, 1):
            found = boxes.get(2 * j + p, [])
            # Fewer boxes than a line needs cannot make one: skip the chaining.
            line = _chain(found) if len(found) >= MIN_BOXES else []
            # Touching letters count as the letters they span, but a line needs separate glyphs too:
            # two wide bone fragments side by side are not a word.
            marks = sum(b.marks for b in line) if len(line) >= MIN_BOXES else 0
            if marks > top[0]:
                top = (marks, float(np.median([b.h for b in line])))
        best.append(top)
    return best


def _flat_filter(x: np.ndarray, k: int, op: np.ufunc) -> np.ndarray:
    """``op`` (``np.minimum`` or ``np.maximum``) over a ``k``×``k`` window (``k`` odd) of each slice of an
    ``(S, H, W)`` stack, with scipy.ndimage's default ``reflect`` edges: exactly
    ``minimum_filter(x, size=(1, k, k))`` (or ``maximum_filter``), pass by pass along each axis.

    scipy's filters cost ~10 ns per pixel and pass on these small bands, more than the rest of the
    screen together; windows grown by doubling are a few whole-array ``op`` calls per axis.
    """
    for axis in (1, 2):
        x = _flat_filter_1d(x, k, op, axis)
    return x


def _flat_filter_1d(x: np.ndarray, k: int, op: np.ufunc, axis: int) -> np.ndarray:
    r = k // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    win = np.pad(x, pad, mode="symmetric")  # scipy's "reflect": d c b a | a b c d | d c b a
    n = x.shape[axis]

    def take(a: np.ndarray, start: int, length: int) -> np.ndarray:
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, start + length)
        return a[tuple(index)]

    # win holds the op over windows of `span` samples starting at each position; double it up to k.
    span = 1
    while 2 * span <= k:
        length = win.shape[axis] - span
        win = op(take(win, 0, length), take(win, span, length))
        span *= 2
    # Two overlapping windows of `span` cover k samples (the op is idempotent).
    return op(take(win, 0, n), take(win, k - span, n))


def _texture_cut(tophat: np.ndarray, base: int) -> np.ndarray:
    """``max(base, 4 × median)`` of each slice of a uint8 top-hat stack, exactly.

    The median is computed only for slices where it can matter: when more than half of a slice is at
    most ``base // 4``, its median cannot exceed that, and the cut is ``base`` (most radiograph bands).
    """
    size = tophat.shape[1] * tophat.shape[2]
    low = np.count_nonzero((tophat <= base // 4).reshape(len(tophat), -1), axis=1) > size // 2
    cut = np.full(len(tophat), float(base))
    busy = np.flatnonzero(~low)
    if busy.size:
        cut[busy] = np.maximum(base, 4.0 * _median_uint8(tophat[busy]))
    return cut


def _median_uint8(x: np.ndarray) -> np.ndarray:
    """``np.median`` of each slice of a uint8 ``(S, H, W)`` stack, from per-slice histograms."""
    s, size = len(x), x.shape[1] * x.shape[2]
    offsets = (np.arange(s, dtype=np.intp) * 256)[:, None]
    counts = np.bincount((x.reshape(s, -1) + offsets).ravel(), minlength=256 * s).reshape(s, 256)
    cum = np.cumsum(counts, axis=1)
    # The two middle order statistics (the same one when the size is odd), averaged as np.median does.
    low = (cum > (size - 1) // 2).argmax(axis=1)
    high = (cum > size // 2).argmax(axis=1)
    return (low + high) / 2.0


class _Box(NamedTuple):
    """One glyph-like component: centre row, left and right column, height, and letters it spans."""

    y: float
    x0: int
    x1: int
    h: int
    marks: int


def _glyph_boxes(mask: np.ndarray, lo: float, hi: float) -> dict[int, list[_Box]]:
    """Connected components shaped like glyphs (or a few touching ones), per slice of the ``(S, H, W)``
    mask, each slice's sorted by left edge (then by the raster order of their first pixel).

    Shapes are tested on arrays of every component at once, not in a Python loop: most components
    are specks that fail the test.
    """
    slab, top, bottom, left, right, area = _components(mask)
    h, w = bottom - top, right - left
    # Glyph-sized and not a hair-thin line; up to four heights wide, since bold or tightly set letters
    # touch (such a box counts as the letters it spans); neither a solid blob (an electrode) nor a
    # sparse scribble (noise, a wire loop).
    fill = area / np.maximum(h * w, 1)
    keep = (lo <= h) & (h <= hi) & (0.15 * h <= w) & (w <= 4 * h) & (fill >= 0.15) & (fill <= 0.85)
    out: dict[int, list[_Box]] = {}
    # In raster order of the first pixel, so that the stable sort by x0 below breaks ties that way.
    for c in np.flatnonzero(keep):
        marks = min(2, max(1, round(float(w[c]) / (0.9 * float(h[c])))))
        box = _Box((float(top[c]) + float(bottom[c])) / 2.0, int(left[c]), int(right[c]), int(h[c]), marks)
        out.setdefault(int(slab[c]), []).append(box)
    for boxes in out.values():
        boxes.sort(key=lambda b: b.x0)
    return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """The 4-connected components of each slice of a boolean ``(S, H, W)`` stack, in the raster order
    of their first pixel: slice, top row, bottom row + 1, left column, right column + 1, pixel count.

    Components are found on runs (the horizontal stretches of set pixels) rather than pixels: two runs
    on neighbouring rows of one slice join when their columns overlap, and the run graph's components
    come from a union-find done with array operations. It keeps scipy (~0.3 s to import in every
    ingest worker, more than the screen's work on a batch) out of the ingest.
    """
    _, h, w = mask.shape
    rows = mask.reshape(-1, w)
    starts = rows.copy()
    starts[:, 1:] &= ~rows[:, :-1]  # set, with the pixel to the left clear
    ends = rows.copy()
    ends[:, :-1] &= ~rows[:, 1:]  # set, with the pixel to the right clear
    # flatnonzero of the 2-D view: several times faster than nonzero of the 3-D stack.
    line_of_start, c0 = np.divmod(np.flatnonzero(starts), w)  # raster order: by slice, row, column
    c1 = np.flatnonzero(ends) % w + 1  # each run's end (exclusive), in the same order
    n = len(c0)
    if n == 0:
        return tuple(np.zeros(0, dtype=np.intp) for _ in range(6))
    slab, row = np.divmod(line_of_start, h)
    # One global row number per (slice, row), with a gap between slices so that none join.
    line = slab * (h + 1) + row
    parent = _join(_touching_runs(line, c0, c1, w + 2), n)
    roots, comp = np.unique(parent, return_inverse=True)  # roots: each component's first run
    m = len(roots)
    bottom = np.zeros(m, dtype=np.intp)
    np.maximum.at(bottom, comp, row + 1)
    left = np.full(m, w, dtype=np.intp)
    np.minimum.at(left, comp, c0)
    right = np.zeros(m, dtype=np.intp)
    np.maximum.at(right, comp, c1)
    area = np.bincount(comp, weights=c1 - c0, minlength=m).astype(np.intp)
    return slab[roots], row[roots], bottom, left, right, area


def _touching_runs(line: np.ndarray, c0: np.ndarray, c1: np.ndarray, stride: int) -> tuple[np.ndarray, ...]:
    """Pairs ``(a, b)`` of runs, ``a`` on the line above ``b``, whose columns overlap (4-connected).

    Runs are in raster order, so the runs above ``b`` that overlap it are the consecutive ones from the
    first that ends after ``b`` starts to the last that starts before ``b`` ends.
    """
    start_key, end_key = line * stride + c0, line * stride + c1
    above = (line - 1) * stride
    first = np.searchsorted(end_key, above + c0, side="right")
    stop = np.searchsorted(start_key, above + c1, side="left")
    count = np.maximum(stop - first, 0)
    b = np.repeat(np.arange(len(line)), count)
    offsets = np.arange(len(b)) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(first, count) + offsets, b


def _join(pairs: tuple[np.ndarray, ...], n: int) -> np.ndarray:
    """Union-find over ``n`` nodes joined by ``pairs``: each node's root, the smallest node of its set.

    Each round hooks every pair's larger root under the smaller one, then compresses every path, until
    no pair spans two roots; parents only ever point to smaller nodes, so no cycle can form.
    """
    a, b = pairs
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[split], np.minimum(ra, rb)[split])
        while True:
            hop = parent[parent]
            if np.array_equal(hop, parent):
                break
            parent = hop


def _chain(boxes: list[_Box]) -> list[_Box]:
    """The chain of the most letters, left to right on one centre line, with glyph spacing and heights.

    A gap of up to two heights is bridged, so that a punctuation mark too small to be a glyph
    (``^``, ``-``, ``:``) does not break a line.
    """
    used = [False] * len(boxes)
    longest: list[_Box] = []
    for i, start in enumerate(boxes):
        if used[i]:
            continue
        line, last = [start], start
        used[i] = True
        for j in range(i + 1, len(boxes)):
            cand = boxes[j]
            if cand.x0 > last.x1 + 3 * last.h:
                break  # sorted by x0: nothing further right can be the next glyph
            if used[j] or cand.x0 - last.x1 > 2 * last.h:
                continue
            if abs(cand.y - last.y) < 0.35 * last.h and 0.5 <= cand.h / last.h <= 2.0:
                line.append(cand)
                used[j] = True
                last = cand
        if sum(b.marks for b in line) > sum(b.marks for b in longest):
            longest = line
    return longest


def ocr_words(pixels: np.ndarray, *, timeout_s: float = 20.0) -> int | None:
    """How many words tesseract reads in the top and bottom bands, or None when it is not installed.

    Words are runs of three or more letters or digits; the text itself is discarded at once, since it
    may be the patient's name. Bands are upscaled so that small text reaches tesseract's working size.

    Args:
        pixels: the decoded image, float in ``[0, 1]``.
        timeout_s: per-band limit on the tesseract process.

    Returns:
        The number of words, or None when tesseract is absent or fails.
    """
    exe = shutil.which("tesseract")
    if exe is None:
        return None
    from PIL import Image

    img = np.asarray(pixels, dtype=np.float32)
    n_band = max(4, round(img.shape[0] * BAND))
    words = 0
    with tempfile.TemporaryDirectory(prefix="medvae-ocr-") as tmp:
        for i, rows in enumerate((img[:n_band], img[-n_band:])):
            grey = Image.fromarray(np.clip(rows * 255.0 + 0.5, 0, 255).astype(np.uint8))
            scale = max(1, round(600 / max(1, grey.width)))
            path = Path(tmp) / f"band{i}.png"
            grey.resize((grey.width * scale, grey.height * scale), Image.Resampling.LANCZOS).save(path)
            text = _run_tesseract(exe, path, timeout_s)
            if text is None:
                return None
            words += sum(sum(c.isalnum() for c in w) >= 3 for w in text.split())
    return words


def _run_tesseract(exe: str, image: Path, timeout_s: float) -> str | None:
    """tesseract's text for one image (page segmentation: a block of text), None when it fails."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [exe, str(image), "stdout", "--psm", "6"],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.decode("utf-8", "replace")
    return None
