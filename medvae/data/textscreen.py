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
down first, so the cost stays a few milliseconds whatever the image size.

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
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

__all__ = ["TextFinding", "find_text", "ocr_words"]

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
    img = np.asarray(pixels, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 8:
        return None
    per_stored = max(img.shape) / float(stored_size)  # decoded pixels per stored pixel
    # Glyph boxes of digits and capitals are about the nominal height; accept a quarter less. Below five
    # decoded pixels a "glyph" cannot be told from noise (speckle in a small MR), and it is not legible.
    smallest = max(_MIN_GLYPH_PX, 0.75 * min_text_px * per_stored)
    factor = max(1, int(smallest // _WORK_HEIGHT))
    best: TextFinding | None = None
    n_band = max(4, round(img.shape[0] * BAND))
    for band, rows in (("top", img[:n_band]), ("bottom", img[-n_band:])):
        marks, height = _longest_line(_block_mean(rows, factor), smallest / factor)
        if marks >= MIN_MARKS and (best is None or marks > best.marks):
            best = TextFinding(band, marks, height * factor / per_stored)
    return best


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """``img`` reduced by ``factor`` in each direction by block averaging (an anti-aliased shrink)."""
    if factor == 1:
        return img
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    return img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _longest_line(band: np.ndarray, lo: float) -> tuple[int, float]:
    """The most glyph-like marks on one line in ``band``, bright or dark, and their median height."""
    k = max(3, round(lo) | 1)  # wider than the strokes of all glyphs searched for (bold ones too)
    if min(band.shape) < k + 2:
        return 0, 0.0
    # uint8: the min/max filters run about twice as fast as on float32, and 1/255 is fine enough here.
    grey = np.clip(band * 255.0 + 0.5, 0, 255).astype(np.uint8)
    threshold = round(CONTRAST * 255)
    best: tuple[int, float] = (0, 0.0)
    for polarity in (grey, 255 - grey):
        # White top-hat: what an opening wider than the strokes removes (on the inverted band, dark text).
        # (minimum then maximum filter is grey_opening without its per-call set-up, which dominated here)
        tophat = polarity - ndi.maximum_filter(ndi.minimum_filter(polarity, size=k), size=k)
        # Strokes must also stand out from the band's own texture: speckle (ultrasound, a small MR) has
        # a high top-hat everywhere, and typed text is far brighter than that texture.
        texture = float(np.median(tophat))
        boxes = _glyph_boxes(tophat > max(threshold, 4.0 * texture), lo, _HEIGHT_RANGE * lo)
        line = _chain(boxes)
        # Touching letters count as the letters they span, but a line needs separate glyphs too:
        # two wide bone fragments side by side are not a word.
        marks = sum(b.marks for b in line) if len(line) >= MIN_BOXES else 0
        if marks > best[0]:
            best = (marks, float(np.median([b.h for b in line])))
    return best


# Connected components are 4-connected (scipy's default), given explicitly to skip building it per call.
_FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


class _Box(NamedTuple):
    """One glyph-like component: centre row, left and right column, height, and letters it spans."""

    y: float
    x0: int
    x1: int
    h: int
    marks: int


def _glyph_boxes(mask: np.ndarray, lo: float, hi: float) -> list[_Box]:
    """Connected components shaped like glyphs (or a few touching ones), sorted by their left edge."""
    labels, n = ndi.label(mask, structure=_FOUR_CONNECTED)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    out = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        h = sl[0].stop - sl[0].start
        w = sl[1].stop - sl[1].start
        # Glyph-sized and not a hair-thin line; up to four heights wide, since bold or tightly set
        # letters touch (such a box counts as the letters it spans); neither a solid blob (an
        # electrode) nor a sparse scribble (noise, a wire loop).
        if lo <= h <= hi and 0.15 * h <= w <= 4 * h and 0.15 <= areas[i] / (h * w) <= 0.85:
            marks = min(2, max(1, round(w / (0.9 * h))))
            out.append(_Box((sl[0].start + sl[0].stop) / 2.0, sl[1].start, sl[1].stop, h, marks))
    out.sort(key=lambda b: b.x0)
    return out


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
