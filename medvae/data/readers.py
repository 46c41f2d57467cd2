"""Decode DICOM, PNG and JPEG files into windowed greyscale images with an allow-list of technical metadata.

Every file ends in one of two ways: a list of :class:`DecodedImage` (float32 in ``[0, 1]``, bright =
dense, at the stored resolution) or a :class:`RejectedInput` whose message says what is wrong and,
where there is one, what to change. Nothing else escapes: a file from an archive is untrusted input,
and one bad file must never stop an ingest of thousands.

Policies, and why:

* **Not scans.** DICOM objects that carry pixels but are not acquisitions of a patient (segmentation
  masks, radiotherapy dose grids, structure sets, plans, reports, presentation states, key-object
  notes, encapsulated documents, waveforms, registrations, raw data) are rejected: training a
  generative model of anatomy on label masks or dose clouds teaches it the wrong distribution.
* **Burned-in annotation.** With ``reject_burned_in`` a DICOM that declares
  ``BurnedInAnnotation = YES`` is rejected, because its pixels may carry the patient's name or ID,
  which no metadata scrubbing removes. The kinds that often carry burned-in text without saying so
  (``burned_in_unless_declared``: Secondary Capture, US, OT, XC, ES by default) are rejected unless they
  declare ``BurnedInAnnotation = NO``. And every decoded image, DICOM or not, is screened for lines of
  text in its top and bottom bands (:mod:`medvae.data.textscreen`, ``burned_in_text``); a file that
  shows some is rejected as ``burned-in text suspected (...)``, or ingested with a note.
* **Multi-frame.** ``multiframe: middle`` keeps only frame ``n_frames // 2``: the middle of a cine
  loop or stack is representative of it, whereas every frame would multiply strongly correlated
  near-duplicates into the training set (and leak across splits as if they were independent scans).
  ``multiframe: all`` yields one image per frame for callers that want them anyway.
* **Memory bound.** Declared sizes are checked against ``max_pixels`` *before* anything is decoded
  (DICOM ``Rows × Columns × samples × frames decoded``, PNG/JPEG header size), so a forged header
  cannot make the decoder allocate gigabytes.
* **Metadata.** Only the technical attributes in :data:`medvae.data.deid.ALLOWED_META` are returned,
  and never patient, physician, institution, date, instance UID or private data. Their free-text values
  are kept only when they are defined terms (:func:`medvae.data.deid.defined_term`): a Body Part
  Examined of ``ZZQ800BODY DOE`` is returned as None, and so is an unknown SOP Class UID.
  Two exceptions travel beside the metadata and must never be stored: ``patient_ref`` (the raw
  PatientID), so the caller can replace it with a keyed hash for patient-level splitting, and
  ``identifiers`` (the patient's name components, IDs and dates), so that a label naming the patient
  can be refused (:mod:`medvae.data.labels`).
* **Reasons.** A rejection reason never quotes the file: no attribute value, no bytes, no decoder
  message (decoders echo data, and reasons are tallied into the store's lineage and printed in logs).
  Decoder failures are reported by the exception's class; values are described, not shown.

Intensity pipeline for greyscale DICOM (PS3.3 C.11): stored values → Modality LUT (rescale
slope/intercept or Modality LUT Sequence, giving e.g. Hounsfield units) → VOI (the first VOI LUT, else
the first Window Center/Width, else a robust percentile window) → ``[0, 1]`` → inverted for
MONOCHROME1 so that bright always means dense. Colour (RGB, YBR, palette) is reduced to BT.601
luminance of the values scaled by their maximum, without further windowing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medvae._io import read_bounded
from medvae.config import IngestConfig
from medvae.data.decoded import META_KEYS, DecodedImage, RejectedInput, decoder_failure, empty_meta
from medvae.data.transforms import percentile_window, rgb_to_grey

if TYPE_CHECKING:  # the text screen (scipy) is imported only when it runs
    from medvae.data.textscreen import TextFinding

__all__ = [
    "META_KEYS",
    "SNIFF_BYTES",
    "DecodedImage",
    "RejectedInput",
    "decode_bytes",
    "decode_file",
    "read_scan",
    "screen_burned_in_text",
    "sniff_format",
    "text_screen_frames",
]


# How many leading bytes sniff_format needs: the 128-byte DICOM preamble plus "DICM".
SNIFF_BYTES = 132

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# A data set written without preamble and File Meta starts with its lowest group, which in practice is
# 0002 (a meta group without preamble) or 0008 (Identifying module). Either byte order.
_RAW_DATASET_FIRST_GROUPS = frozenset({0x0002, 0x0008})


def sniff_format(head: bytes, name: str) -> Literal["dicom", "png", "jpeg", "other"]:
    """Tell the container format from the first bytes, falling back to the file name for raw DICOM.

    Magic bytes decide first: ``DICM`` at offset 128, the PNG signature, a JPEG start-of-image marker.
    A DICOM data set stored without preamble and File Meta has no magic, so it is accepted on the name
    alone when that ends in ``.dcm``/``.dicom``, and for extensionless (or UID-named, e.g.
    ``1.2.840.113619.2.55``) names only when the first tag looks like the start of a data set;
    whether it really parses is decided by :func:`decode_bytes`.

    Args:
        head: the first bytes of the file; :data:`SNIFF_BYTES` are enough.
        name: the file name or path, used only for the fallback.

    Returns:
        ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"other"``.
    """
    if len(head) >= SNIFF_BYTES and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SOI):
        return "jpeg"
    suffix = PurePath(name).suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return "dicom"
    if (suffix == "" or suffix[1:].isdigit()) and len(head) >= 8:
        group_le = int.from_bytes(head[0:2], "little")
        group_be = int.from_bytes(head[0:2], "big")
        if group_le in _RAW_DATASET_FIRST_GROUPS or group_be in _RAW_DATASET_FIRST_GROUPS:
            return "dicom"
    return "other"


def decode_file(path: Path, cfg: IngestConfig) -> list[DecodedImage]:
    """Read a file (refusing anything over ``cfg.max_file_bytes``) and decode it.

    Args:
        path: the file to read.
        cfg: ingest settings (size limits, windowing and policies).

    Returns:
        One image, or one per frame for a multi-frame DICOM with ``multiframe: all``.

    Raises:
        RejectedInput: the file is unreadable, too large, not a supported format, broken, or refused
            by policy; the message says which.
    """
    return decode_bytes(read_scan(path, cfg), path.name, cfg)


def read_scan(path: Path, cfg: IngestConfig) -> bytes:
    """The bytes of a scan file: a regular file within ``cfg.max_file_bytes``, read with a bounded buffer.

    Checked before opening, because opening a FIFO or a device would block or read without end.

    Raises:
        RejectedInput: the file is missing, not a regular file, too large or unreadable.
    """
    try:
        if not path.exists():
            raise RejectedInput("file not found (moved or deleted since it was listed?)")
        if not path.is_file():
            raise RejectedInput("not a regular file (a directory, device or pipe)")
        size = path.stat().st_size
        if size > cfg.max_file_bytes:
            raise RejectedInput(
                f"file is {size} bytes, over max_file_bytes={cfg.max_file_bytes}; not read "
                "(raise max_file_bytes to ingest it)"
            )
        with path.open("rb") as fh:
            # Bounded read: the file may have grown since stat().
            return read_bounded(fh, size, cfg.max_file_bytes)
    except OSError as exc:
        # strerror, not str(exc): the latter repeats the path, and reasons are tallied into lineage.
        raise RejectedInput(f"cannot read file: {exc.strerror or type(exc).__name__}") from exc


def decode_bytes(
    data: bytes, name: str, cfg: IngestConfig, *, screen_text: bool = True
) -> list[DecodedImage]:
    """Decode an in-memory DICOM, PNG or JPEG file into windowed greyscale images.

    Args:
        data: the whole file.
        name: the file name, used only to sniff raw DICOM (see :func:`sniff_format`).
        cfg: ingest settings (size limits, windowing and policies).
        screen_text: run the burned-in text screen here. A caller that decodes many files (ingest)
            passes False and screens the whole batch at once with :func:`screen_burned_in_text`.

    Returns:
        One image, or one per frame for a multi-frame DICOM with ``multiframe: all``.

    Raises:
        RejectedInput: the bytes are empty, too large, not a supported format, broken, or refused by
            policy; the message says which.
    """
    if len(data) == 0:
        raise RejectedInput("empty file (0 bytes)")
    if len(data) > cfg.max_file_bytes:
        raise RejectedInput(
            f"file is {len(data)} bytes, over max_file_bytes={cfg.max_file_bytes} "
            "(raise max_file_bytes to ingest it)"
        )
    # Pillow's bomb guard reads this module-level limit (also when pydicom falls back to Pillow for
    # JPEG 2000); align it with the config so that Pillow neither refuses images the config allows nor
    # is looser than it. The explicit header checks below stay authoritative (Pillow only raises above
    # twice the limit).
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    fmt = sniff_format(data[:SNIFF_BYTES], name)
    if fmt == "dicom":
        from medvae.data.dicom_reader import decode_dicom  # pydicom is imported on the first DICOM

        images = decode_dicom(data, cfg)
    elif fmt in ("png", "jpeg"):
        images = [_decode_raster(data, fmt, cfg)]
    else:
        raise RejectedInput(_unsupported_reason(data, name))
    return screen_burned_in_text(images, cfg) if screen_text else images


_NIFTI_NAME = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def _unsupported_reason(data: bytes, name: str) -> str:
    """Why a file of no supported format is rejected, naming the formats users most often point at it.

    A research MRI or CT folder holds NIfTI volumes and gzipped files; "not a DICOM" alone leaves the
    user guessing what to convert. The bytes themselves stay out of the reason: through a followed
    symlink they were a password file and a store key.
    """
    nifti1 = len(data) >= 348 and data[344:347] in (b"n+1", b"ni1")
    nifti2 = len(data) >= 540 and data[4:7] in (b"n+2", b"ni2")
    gzipped = data[:2] == b"\x1f\x8b"
    if nifti1 or nifti2 or (gzipped and _NIFTI_NAME.search(name)):
        return (
            "a NIfTI volume, not a DICOM, PNG or JPEG file: medvae ingests 2-D scans; export the slices "
            "as DICOM or PNG first"
        )
    if gzipped:
        return "a gzip-compressed file, not a DICOM, PNG or JPEG file: decompress it first"
    return (
        "not a DICOM, PNG or JPEG file (no DICM marker at offset 128, no PNG signature, no JPEG "
        "start-of-image, and no .dcm extension)"
    )


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def text_screen_frames(images: Sequence[DecodedImage]) -> list[int]:
    """The frames the burned-in text screen looks at: first, middle and last (overlay text is the same
    on every frame)."""
    return sorted({0, len(images) // 2, len(images) - 1}) if images else []


def screen_burned_in_text(
    images: list[DecodedImage], cfg: IngestConfig, found: Sequence[TextFinding | None] | None = None
) -> list[DecodedImage]:
    """Reject (or note) a file whose images show lines of text in their border bands.

    Args:
        images: one file's decoded images.
        cfg: the ingest config (``burned_in_text``, ``burned_in_min_text_px``, ``burned_in_ocr``).
        found: the text screen's findings for :func:`text_screen_frames`, when the caller screened a
            batch of files at once; None screens them here.

    Returns:
        The images, with a note on each when text was seen and the policy is ``ingest``.

    Raises:
        RejectedInput: when text was seen and the policy is ``reject``.
    """
    if cfg.burned_in_text == "off" or not images:
        return images
    from medvae.data.textscreen import find_text_batch, ocr_words

    picks = text_screen_frames(images)
    if found is None:
        found = find_text_batch([images[i].pixels for i in picks], cfg.size, cfg.burned_in_min_text_px)
    seen: str | None = None
    for i, finding in zip(picks, found, strict=True):
        if finding is not None:
            seen = finding.describe()
            break
        if cfg.burned_in_ocr:
            words = ocr_words(images[i].pixels)
            if words is not None and words >= 2:
                seen = f"OCR read {words} words in the border bands"
                break
    if seen is None:
        return images
    if cfg.burned_in_text == "reject":
        raise RejectedInput(
            f"burned-in text suspected ({seen}); rejected by policy (set burned_in_text: ingest to keep "
            "such files)"
        )
    note = f"burned-in text suspected ({seen}); ingested as burned_in_text: ingest asks"
    return [replace(img, notes=(*img.notes, note)) for img in images]


# --------------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------------

_GREY_8 = frozenset({"L", "LA", "La"})
_GREY_WIDE = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PHOTOMETRIC_BY_MODE = {
    "1": "MONOCHROME2",
    "L": "MONOCHROME2",
    "LA": "MONOCHROME2",
    "La": "MONOCHROME2",
    "I": "MONOCHROME2",
    "I;16": "MONOCHROME2",
    "I;16L": "MONOCHROME2",
    "I;16B": "MONOCHROME2",
    "I;16N": "MONOCHROME2",
    "F": "MONOCHROME2",
    "P": "PALETTE COLOR",
    "PA": "PALETTE COLOR",
    "CMYK": "CMYK",
    "YCbCr": "YBR_FULL",
}
_BITS_BY_MODE = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


# The img.info keys Pillow's getexif reads an orientation from, for PNG and JPEG (TIFF aside).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _decode_raster(data: bytes, fmt: Literal["png", "jpeg"], cfg: IngestConfig) -> DecodedImage:
    label = fmt.upper()
    try:
        # Image.open only parses the header; no pixel data is decoded until load().
        img = Image.open(BytesIO(data), formats=[label])
    except Image.DecompressionBombError as exc:
        raise RejectedInput(
            f"{label} header declares more pixels than max_pixels={cfg.max_pixels}; "
            "not decoded (decompression-bomb guard; raise max_pixels to ingest it)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise RejectedInput(f"corrupt or truncated {label} header: Pillow cannot parse it") from exc
    except Exception as exc:
        raise RejectedInput(f"corrupt {label} header ({decoder_failure(exc)})") from exc

    cols, rows = img.size
    if rows < 1 or cols < 1:
        raise RejectedInput(f"{label} declares an empty image ({cols}×{rows})")
    if rows * cols > cfg.max_pixels:
        raise RejectedInput(
            f"{label} declares {cols}×{rows} = {rows * cols} pixels, over max_pixels={cfg.max_pixels}; "
            "not decoded (decompression-bomb guard; raise max_pixels to ingest it)"
        )
    source_mode = img.mode
    if fmt == "jpeg" and img.mode in ("L", "RGB", "YCbCr"):
        # Decode in the DCT domain at 1/2, 1/4 or 1/8 scale, never below the output side. libjpeg's
        # scaled IDCT keeps only the low-frequency coefficients, so it is itself a proper low-pass,
        # and the area downsample that follows (by a factor below 2) stays anti-aliased. It halves
        # decode time for the 224 px Kermany JPEGs. Asking for "L" makes libjpeg emit the Y channel,
        # which is BT.601 luma: the same weights luminance() uses.
        target = cfg.size
        img.draft("L", (target, target))
    try:
        img.load()
        # A photo of a film taken with a phone may rely on EXIF orientation; DICOM-derived files
        # carry none and are left as they are. Without any of the blocks Pillow reads an orientation
        # from, there is nothing to apply (and parsing for it cost ~25 µs a file).
        has_orientation = any(key in img.info for key in _ORIENTATION_SOURCES)
        transposed = ImageOps.exif_transpose(img) if has_orientation else None
    except Image.DecompressionBombError as exc:
        raise RejectedInput(
            f"{label} is a decompression bomb (more pixels than max_pixels={cfg.max_pixels})"
        ) from exc
    except Exception as exc:
        # The message is read to tell truncation from corruption, never quoted.
        kind = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise RejectedInput(f"{kind} {label} ({decoder_failure(exc)})") from exc
    if transposed is not None and transposed.size != img.size:
        rows, cols = cols, rows
    loaded: Image.Image = transposed if transposed is not None else img

    try:
        pixels, window_kind = _raster_to_grey(loaded)
    except Exception as exc:
        # Pillow's mode names are a fixed vocabulary of the library, not content of the file.
        raise RejectedInput(
            f"cannot convert {label} mode {loaded.mode!r} to greyscale ({decoder_failure(exc)})"
        ) from exc

    meta = empty_meta(fmt)
    meta.update(
        photometric=_PHOTOMETRIC_BY_MODE.get(source_mode, "RGB"),
        orig_rows=rows,
        orig_cols=cols,
        bits_stored=_BITS_BY_MODE.get(source_mode, 8),
        window=window_kind,
    )
    return DecodedImage(pixels=pixels, meta=meta, patient_ref=None, frame_index=0, n_frames=1)


def _raster_to_grey(img: Image.Image) -> tuple[np.ndarray, Literal["dtype", "percentile"]]:
    """Pixels of a loaded Pillow image as float32 ``[0, 1]`` greyscale, and how they were scaled."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), "dtype"
    if mode == "L":
        return np.asarray(img, dtype=np.float32) * np.float32(1 / 255), "dtype"
    if mode in _GREY_8:
        return np.asarray(img.getchannel(0), dtype=np.float32) * np.float32(1 / 255), "dtype"
    if mode in _GREY_WIDE or mode == "F":
        # The stored bit depth of a 16-bit PNG is unknown (12-bit detectors are common), so scaling by
        # 65535 would leave most images nearly black: window on the image's own distribution.
        arr = np.asarray(img)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return percentile_window(arr), "percentile"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
        # Palette, CMYK, YCbCr, LAB, HSV, PA: let Pillow produce RGB (PA keeps its alpha to drop below).
        img = img.convert("RGBA" if mode == "PA" else "RGB")
    rgb = np.asarray(img)[..., :3]
    return rgb_to_grey(rgb, 255), "dtype"


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------
