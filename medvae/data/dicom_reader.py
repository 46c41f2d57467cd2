"""Decode DICOM files: the policies and the intensity pipeline of :mod:`medvae.data.readers` for DICOM.

A module of its own because pydicom and its pixel plugins take ~0.3 s to import: a worker that ingests
a folder of PNG or JPEG files never pays it (:func:`medvae.data.readers.decode_bytes` imports this
module on the first DICOM it meets). The policies are described in the readers' module docstring.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from io import BytesIO
from typing import Any, Literal

import numpy as np
import pydicom
import pydicom.uid
import pydicom.valuerep
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

from medvae.config import IngestConfig
from medvae.data.decoded import DecodedImage, RejectedInput, decoder_failure, empty_meta
from medvae.data.deid import defined_term, known_uid_name
from medvae.data.labels import Identifiers
from medvae.data.transforms import percentile_window, rgb_to_grey, window

__all__ = ["decode_dicom"]

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})

# SOP classes that carry no acquisition of a patient, matched (re.search) against the SOP Class UID
# keyword (e.g. "ComprehensiveSRStorage"), with the reason a person reads. Anchored where a loose
# match would catch an image class (e.g. "Plan" is in XRayAngiographicBiPlaneImageStorage).
_NON_SCAN_SOP_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), why)
    for pattern, why in (
        (r"Segmentation", "a segmentation (a label mask derived from a scan), not a scan"),
        (r"^RTDose", "a radiotherapy dose grid, not a scan"),
        (r"^RTStructureSet", "a radiotherapy structure set (contours), not a scan"),
        (r"^RT\w*PlanStorage$", "a radiotherapy plan, not a scan"),
        (r"TreatmentRecord", "a radiotherapy treatment record, not a scan"),
        (r"SRStorage", "a structured report (a document), not a scan"),
        (r"PresentationState", "a presentation state (display settings), not a scan"),
        (r"^KeyObjectSelection", "a key-object selection (a list of references), not a scan"),
        (r"^Encapsulated", "an encapsulated document, not a scan"),
        (r"Waveform", "a waveform recording, not a scan"),
        (r"Registration", "a spatial registration, not a scan"),
        (r"^RawData", "raw acquisition data, not a reconstructed scan"),
    )
)
# The same policy by Modality, for files whose SOP Class UID is missing, private or unknown.
_NON_SCAN_MODALITIES: dict[str, str] = {
    "SEG": "a segmentation (a label mask derived from a scan), not a scan",
    "RTDOSE": "a radiotherapy dose grid, not a scan",
    "RTSTRUCT": "a radiotherapy structure set (contours), not a scan",
    "RTPLAN": "a radiotherapy plan, not a scan",
    "RTRECORD": "a radiotherapy treatment record, not a scan",
    "PLAN": "a plan, not a scan",
    "SR": "a structured report (a document), not a scan",
    "PR": "a presentation state (display settings), not a scan",
    "KO": "a key-object selection (a list of references), not a scan",
    "DOC": "an encapsulated document, not a scan",
    "REG": "a spatial registration, not a scan",
    "FID": "a set of fiducials, not a scan",
    "ECG": "a waveform recording, not a scan",
    "HD": "a waveform recording, not a scan",
    "AU": "an audio recording, not a scan",
}

# Image Pixel module attributes that are integers (VR US), and the VRs that hold an integer.
_IMAGE_PIXEL_INTEGERS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
)
_INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "US or SS"})
_KNOWN_VRS = frozenset(vr.value for vr in pydicom.valuerep.VR)
# Defined terms of PhotometricInterpretation (PS3.3 C.7.6.3.1.2) that medvae does not decode; naming one
# in a reason is safe, naming an arbitrary value is not.
_OTHER_PHOTOMETRIC = frozenset({"HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "XYB"})

# A generous bound on everything in a data set except its pixels, for the deflate guard below.
_NON_PIXEL_BYTES_ALLOWANCE = 64 * 2**20


def decode_dicom(data: bytes, cfg: IngestConfig) -> list[DecodedImage]:
    """Decode an in-memory DICOM file into windowed greyscale images (one per kept frame).

    Raises:
        RejectedInput: the file is broken, not a scan, or refused by policy; the message says which.
    """
    try:
        return _decode_dicom_checked(data, cfg)
    except RejectedInput:
        raise
    except MemoryError as exc:
        raise RejectedInput("out of memory while decoding the DICOM (lower workers or max_pixels)") from exc
    except Exception as exc:
        # Malformed files trip pydicom in many places (bad VRs, odd lengths, LUTs that do not match
        # their descriptors); every one of them is a property of the file, so it becomes a rejection.
        raise RejectedInput(f"malformed DICOM ({decoder_failure(exc)})") from exc


def _decode_dicom_checked(data: bytes, cfg: IngestConfig) -> list[DecodedImage]:
    has_preamble = data[128:132] == b"DICM"
    _guard_deflate(data, cfg)
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
    except Exception as exc:
        raise RejectedInput(f"unreadable DICOM ({decoder_failure(exc)})") from exc
    if not has_preamble:
        _require_plausible_dataset(ds)
    ts = _ensure_transfer_syntax(ds)
    # Only standard names and defined terms from here on: they go into reasons and metadata alike.
    sop_name = known_uid_name(_sop_class_uid(ds), "SOP Class")
    modality = defined_term("modality", ds.get("Modality"))

    if not any(kw in ds for kw in _PIXEL_DATA_KEYWORDS):
        _reject_without_pixels(ds, sop_name, modality)
    _check_scan_policy(ds, sop_name, modality)
    _check_image_pixel_vrs(ds)

    rows, cols = _positive_int(ds.get("Rows")), _positive_int(ds.get("Columns"))
    if rows is None or cols is None:
        raise RejectedInput("invalid image size: Rows or Columns is missing, zero or not a number")
    spp = _positive_int(ds.get("SamplesPerPixel")) or 1
    if spp not in (1, 3):
        raise RejectedInput(f"unsupported SamplesPerPixel={spp} (only 1 or 3)")
    n_frames = _positive_int(ds.get("NumberOfFrames")) or 1
    # Bound what will actually be decoded: one frame for "middle" (pydicom decodes just that frame),
    # every frame for "all". Checked before the frame list exists, as NumberOfFrames may be forged.
    n_decoded = n_frames if cfg.multiframe == "all" else 1
    decoded_pixels = rows * cols * spp * n_decoded
    if decoded_pixels > cfg.max_pixels:
        raise RejectedInput(
            f"declared size {rows}×{cols}×{spp} samples×{n_decoded} frame(s) = {decoded_pixels} values, "
            f"over max_pixels={cfg.max_pixels}; not decoded (raise max_pixels to ingest it)"
        )
    frames = list(range(n_frames)) if cfg.multiframe == "all" else [n_frames // 2]
    if _positive_int(ds.get("BitsAllocated")) == 1:
        raise RejectedInput("1-bit pixels (BitsAllocated=1): a binary mask, not a scan")

    _check_burned_in_policy(ds, sop_name, modality, cfg)

    photometric = _text(ds.get("PhotometricInterpretation")) or ("MONOCHROME2" if spp == 1 else "RGB")
    if photometric not in _MONOCHROME | _COLOUR and photometric != "PALETTE COLOR":
        # Named only when it is a defined term: the attribute is free text to a broken writer.
        shown = repr(photometric) if photometric in _OTHER_PHOTOMETRIC else "(not a defined term)"
        raise RejectedInput(f"unsupported PhotometricInterpretation {shown}")

    _check_pixel_encoding(ds, ts, n_frames)
    raw_frames = _decode_frames(ds, ts, frames, n_frames)
    signed_codestream = _j2k_signed_despite_header(ds, ts, n_frames, photometric)
    meta_base = _dicom_meta(ds, ts, sop_name, modality, photometric, rows, cols)
    return _frames_to_images(
        ds, frames, raw_frames, (rows, cols, spp, n_frames), photometric, signed_codestream, meta_base, cfg
    )


def _reject_without_pixels(ds: Dataset, sop_name: str | None, modality: str | None) -> None:
    """Raise the reason a data set without pixel data is not ingested."""
    if _sop_class_uid(ds) is None and ds.get("Modality") is None:
        # Nothing says what this is, so it is not a well-formed non-image object (an SR names its SOP
        # class): most often a file cut short after its header, or a preamble and "DICM" and nothing.
        raise RejectedInput(
            f"no pixel data, SOP Class UID or Modality ({len(ds)} data elements parsed): "
            "the data set is empty or the file is truncated"
        )
    what = sop_name or (f"Modality {modality}" if modality else "this object (of an unknown class)")
    if sop_name and "Image" in sop_name:
        raise RejectedInput(
            f"no pixel data although {sop_name} is an image class: the file is probably truncated"
        )
    raise RejectedInput(f"no pixel data: {what} is not an image (e.g. structured report)")


def _frames_to_images(
    ds: Dataset,
    frames: list[int],
    raw_frames: list[np.ndarray],
    shape: tuple[int, int, int, int],
    photometric: str,
    signed_codestream: bool,
    meta_base: dict[str, Any],
    cfg: IngestConfig,
) -> list[DecodedImage]:
    """The decoded frames as grey images, each checked against the declared shape."""
    rows, cols, spp, n_frames = shape
    patient_id = ds.get("PatientID")
    # Not _text(): an identifier must never be shortened (two long IDs could collide after hashing).
    patient_ref = (str(patient_id).strip().strip("\x00").strip() or None) if patient_id is not None else None
    identifiers = _identifiers(ds)
    out: list[DecodedImage] = []
    for frame_index, raw in zip(frames, raw_frames, strict=True):
        expected = (rows, cols) if spp == 1 else (rows, cols, 3)
        if raw.shape != expected:
            raise RejectedInput(f"decoded frame has shape {raw.shape}, but the header declares {expected}")
        if not raw.dtype.isnative:
            # Explicit VR Big Endian gives '>i2' arrays; LUT indexing and arithmetic want native order.
            raw = raw.astype(raw.dtype.newbyteorder("="))
        if signed_codestream and raw.dtype.kind == "u":
            raw = raw.view(np.dtype(f"i{raw.dtype.itemsize}"))
        pixels, window_kind = _dicom_frame_to_grey(raw, ds, frame_index, photometric, cfg)
        meta = dict(meta_base, window=window_kind)
        out.append(
            DecodedImage(
                pixels=pixels,
                meta=meta,
                patient_ref=patient_ref,
                frame_index=frame_index,
                n_frames=n_frames,
                identifiers=identifiers,
            )
        )
    return out


def _guard_deflate(data: bytes, cfg: IngestConfig) -> None:
    """Refuse a Deflated Explicit VR data set that would inflate past the memory bound.

    pydicom inflates the whole data set in one ``zlib.decompress`` call with no limit, so a small
    file could expand to many gigabytes before any size check runs. Inflate it here first with a cap.
    """
    if data[128:132] != b"DICM" or pydicom.uid.DeflatedExplicitVRLittleEndian.encode() not in data[:4096]:
        return
    from pydicom.filereader import _read_file_meta_info, read_preamble  # private but stable since 2.x

    fp = BytesIO(data)
    read_preamble(fp, False)
    file_meta = _read_file_meta_info(fp)
    if file_meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    limit = cfg.max_pixels * 8 + _NON_PIXEL_BYTES_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[fp.tell() :], limit)
    except zlib.error as exc:
        raise RejectedInput(
            "corrupt Deflated Explicit VR Little Endian data set (zlib cannot inflate it)"
        ) from exc
    if inflater.unconsumed_tail or len(inflated) >= limit:
        raise RejectedInput(
            f"Deflated data set inflates to more than {limit} bytes (max_pixels={cfg.max_pixels}); "
            "not decoded (decompression-bomb guard)"
        )


def _require_plausible_dataset(ds: Dataset) -> None:
    """A file without preamble is only DICOM if it parsed into real attributes, not noise."""
    from pydicom.datadict import dictionary_has_tag

    tags = list(ds.keys())
    standard = [t for t in tags if not t.is_private and dictionary_has_tag(t)]
    if not standard or not any(kw in ds for kw in ("SOPClassUID", "Modality", "Rows", *_PIXEL_DATA_KEYWORDS)):
        # The first tag is not named: for a file that is not DICOM it is four bytes of its content.
        raise RejectedInput(
            "no DICOM preamble or File Meta header, and the bytes do not parse as a DICOM data set "
            "(no standard image attributes): the file is truncated, shifted or not DICOM"
        )


def _ensure_transfer_syntax(ds: Dataset) -> pydicom.uid.UID:
    """The transfer syntax; for a file without File Meta, the encoding pydicom detected while reading."""
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        return pydicom.uid.UID(str(ts))
    pixel = next((ds[kw] for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if pixel is not None and pixel.is_undefined_length:
        raise RejectedInput(
            "compressed (encapsulated) pixel data but no File Meta header: the codec is unknown"
        )
    implicit, little = ds.original_encoding[:2]
    if implicit:
        ts = pydicom.uid.ImplicitVRLittleEndian
    elif little is False:
        ts = pydicom.uid.ExplicitVRBigEndian
    else:
        ts = pydicom.uid.ExplicitVRLittleEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _check_scan_policy(ds: Dataset, sop_name: str | None, modality: str | None) -> None:
    sop_uid = _sop_class_uid(ds)
    keyword = pydicom.uid.UID(str(sop_uid)).keyword if sop_uid else ""
    for pattern, why in _NON_SCAN_SOP_PATTERNS:
        if pattern.search(keyword):
            mod = f" (Modality {modality})" if modality else ""
            raise RejectedInput(f"policy: {sop_name}{mod} is {why}")
    if modality and modality.upper() in _NON_SCAN_MODALITIES:
        what = sop_name or "object"
        raise RejectedInput(f"policy: Modality {modality} {what} is {_NON_SCAN_MODALITIES[modality.upper()]}")


def _check_burned_in_policy(
    ds: Dataset, sop_name: str | None, modality: str | None, cfg: IngestConfig
) -> None:
    """Refuse files that declare burned-in text, and risky kinds that do not declare its absence."""
    declared = (_text(ds.get("BurnedInAnnotation")) or "").upper()
    if cfg.reject_burned_in and declared == "YES":
        raise RejectedInput(
            "BurnedInAnnotation YES: pixels may carry burned-in patient text; rejected by policy "
            "(set reject_burned_in: false to ingest)"
        )
    risky = set(cfg.burned_in_unless_declared)
    kind: str | None = None
    if "SC" in risky and sop_name and "Secondary Capture" in sop_name:
        kind, code = sop_name, "SC"
    elif modality in risky:
        kind, code = f"Modality {modality}", str(modality)
    if kind is not None and declared != "NO":
        state = "absent" if not declared else "not NO"
        raise RejectedInput(
            f"burned-in text risk: {kind} often carries burned-in patient text and its "
            f"BurnedInAnnotation is {state}; rejected by policy (check the pixels and set "
            f"BurnedInAnnotation NO, or remove {code} from burned_in_unless_declared)"
        )


# Identifying attributes read for label vetting only (see DecodedImage.identifiers).
_NAME_KEYWORDS = ("PatientName", "OtherPatientNames")
_ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber")


def _identifiers(ds: Dataset) -> Identifiers:
    """The patient's name components, IDs and every top-level date of a data set, for label vetting."""
    names: set[str] = set()
    ids: set[str] = set()
    for keyword in _NAME_KEYWORDS:
        for value in _values(ds, keyword):
            # Component groups (=), components (^) and the words within them, each matched on its own.
            names.update(w for w in re.split(r"[^0-9a-z]+", value.lower()) if len(w) >= 2)
    for keyword in _ID_KEYWORDS:
        ids.update(c for c in (Identifiers.compact(v) for v in _values(ds, keyword)) if c)
    return Identifiers(frozenset(names), frozenset(ids), frozenset(_dates(ds)))


def _values(ds: Dataset, keyword: str) -> list[str]:
    """Every value of a (possibly multi-valued) attribute as text; nothing when it cannot be read."""
    try:
        value = ds.get(keyword)
    except Exception:
        return []  # a malformed value: vetting must not reject the file for it
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v) for v in items if str(v).strip()]


def _dates(ds: Dataset) -> set[str]:
    """Every DA or DT value at the top level of ``ds`` as ``YYYYMMDD`` (study, series, birth, ...).

    Raw elements are read without converting their values (a malformed date must not fail the file);
    sequences are not descended into, which keeps this cheap on enhanced multi-frame files.
    """
    from pydicom.datadict import dictionary_VR

    out: set[str] = set()
    # keys(), not iteration: iterating a Dataset converts every raw element, a malformed one included.
    for tag in ds.keys():  # noqa: SIM118
        try:
            elem = ds.get_item(tag)
            vr = elem.VR or dictionary_VR(tag)
        except Exception:
            continue
        if vr not in ("DA", "DT"):
            continue
        raw = elem.value
        text = raw.decode("ascii", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw or "")
        out.update(m for m in re.findall(r"\d{8}", text.replace("-", "").replace(".", "")))
    return out


def _check_image_pixel_vrs(ds: Dataset) -> None:
    """Refuse Image Pixel attributes stored under a non-integer VR, naming the attribute.

    Explicit VR files carry each attribute's VR, and a broken writer can store Rows as DS "512.0" or
    BitsAllocated as LO. A lenient int() reads some of those, but pydicom's decoders then fail with
    "'DSfloat' object cannot be interpreted as an integer" or "'<=' not supported between 'str' and
    'int'", which says nothing about the file.
    """
    for keyword in _IMAGE_PIXEL_INTEGERS:
        if keyword in ds:
            elem = ds[keyword]
            if elem.VR not in _INTEGER_VRS:
                # Two bytes of the file: named only when they spell a VR the standard defines.
                vr = elem.VR if elem.VR in _KNOWN_VRS else "(not a VR)"
                raise RejectedInput(
                    f"{elem.tag} {keyword} is stored with VR {vr}, but the standard says US: the "
                    "file was written by a broken encoder (re-export it, or fix the VR with a DICOM tool)"
                )


def _check_pixel_encoding(ds: Dataset, ts: pydicom.uid.UID, n_frames: int) -> None:
    """Refuse pixel data whose storage contradicts the transfer syntax or the declared size, before decoding.

    Without this, a transfer syntax that lies fails deep inside pydicom with a message about item tags
    ("unexpected tag ... when parsing the Basic Offset Table"), and native pixel data holding whole
    frames more than Rows × Columns × NumberOfFrames declare is decoded in full (the max_pixels bound
    counts declared frames only) and then refused for a shape nobody can act on.
    """
    if not ts.is_transfer_syntax:
        return  # a private or unknown UID: the decoder refuses it with a reason that names it
    elem = next((ds[kw] for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if elem is None:
        return
    if ts.is_encapsulated:
        # Encapsulated pixel data is a sequence of items, so it starts with an Item tag (FFFE,E000); judged
        # by content rather than by the undefined length, which some writers replace with the real one.
        value = elem.value if isinstance(elem.value, (bytes, bytearray)) else b""
        if not value.startswith(b"\xfe\xff\x00\xe0"):
            raise RejectedInput(
                f"the transfer syntax is {_ts_label(ts)} (compressed), but the pixel data is not "
                "encapsulated "
                "(no fragment items): it is stored uncompressed, or the File Meta Transfer Syntax UID is "
                "wrong (rewrite it, e.g. as Explicit VR Little Endian)"
            )
        return
    if elem.is_undefined_length:
        raise RejectedInput(
            "the pixel data is compressed (encapsulated fragments), but the transfer syntax is "
            f"{_ts_label(ts)}: "
            "the File Meta Transfer Syntax UID is wrong (set it to the codec the data was compressed with)"
        )
    if not isinstance(elem.value, (bytes, bytearray)):
        return  # pixel data under a wrong VR: left to the decoder, which refuses it
    try:
        from pydicom.pixels.utils import get_expected_length

        expected = int(get_expected_length(ds, "bytes"))
    except Exception:
        return  # size attributes pydicom cannot use: the decoder refuses them with its own reason
    if len(elem.value) < expected:
        # Said here rather than by pydicom, whose message the reason may not quote.
        raise RejectedInput(
            f"pixel data is {len(elem.value)} bytes, less than expected: Rows, Columns, SamplesPerPixel, "
            f"BitsAllocated and NumberOfFrames declare {expected} bytes (the file is truncated)"
        )
    frame_bytes = expected // n_frames
    # Up to one padding byte (odd lengths are padded to even) and any excess short of a frame are
    # ignored by pydicom; a whole frame or more means the header does not describe this data.
    excess = len(elem.value) - (expected + expected % 2)
    if frame_bytes > 0 and excess >= frame_bytes:
        raise RejectedInput(
            f"pixel data is {len(elem.value)} bytes, {excess // frame_bytes} whole frame(s) more than the "
            f"{expected} bytes that Rows, Columns, SamplesPerPixel, BitsAllocated and NumberOfFrames "
            "declare: the header's image size or frame count is wrong"
        )


def _decode_frames(
    ds: Dataset, ts: pydicom.uid.UID, frames: Sequence[int], n_frames: int
) -> list[np.ndarray]:
    """Decode the selected frames; any decoder failure becomes a rejection naming the codec."""
    try:
        if len(frames) == 1 and n_frames > 1:
            # Only the one frame is decoded (native data is still length-checked as a whole).
            return [pixel_array(ds, index=frames[0])]
        arr = ds.pixel_array
        if n_frames == 1:
            return [arr]
        if arr.ndim < 3 or arr.shape[0] != n_frames:
            raise ValueError(f"expected {n_frames} frames, decoder returned shape {arr.shape}")
        return [arr[i] for i in frames]
    except MemoryError:
        raise
    except Exception as exc:
        raise RejectedInput(f"cannot decode {_ts_label(ts)} pixel data ({decoder_failure(exc)})") from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # pylibjpeg-rle is written in Rust, and a malformed RLE segment makes it panic ("index out of
        # bounds"); pyo3 turns the panic into PanicException, which derives from BaseException so that
        # `except Exception` misses it, and one bad file would end the whole ingest.
        raise RejectedInput(
            f"cannot decode {_ts_label(ts)} pixel data: the decoder crashed ({type(exc).__name__}); "
            "the compressed data is corrupt"
        ) from exc


def _j2k_signed_despite_header(ds: Dataset, ts: pydicom.uid.UID, n_frames: int, photometric: str) -> bool:
    """Whether a JPEG 2000 codestream stores signed samples at full precision under PixelRepresentation 0.

    pydicom trusts PixelRepresentation and can only repair a signedness mismatch when the codestream
    precision is below the allocated bits. At full precision the decoded bits are two's complement
    read as unsigned, so CT padding of -2048 arrives as 63488 and air as ~64500, which every window
    then paints white. The codestream's SIZ marker is written by the encoder that saw the values and
    is the better witness, so such frames are reinterpreted as signed.
    """
    if ts not in pydicom.uid.JPEG2000TransferSyntaxes or photometric not in _MONOCHROME:
        return False
    if _positive_int(ds.get("PixelRepresentation")) is not None:  # 1 = already signed
        return False
    try:
        from pydicom.encaps import get_frame
        from pydicom.pixels.utils import get_j2k_parameters

        params = get_j2k_parameters(get_frame(ds.PixelData, 0, number_of_frames=n_frames))
    except Exception:
        # The codestream was decodable a moment ago; failing to parse its header only means no override.
        return False
    return bool(params.get("is_signed")) and params.get("precision") == _positive_int(ds.get("BitsAllocated"))


def _dicom_frame_to_grey(
    raw: np.ndarray, ds: Dataset, frame: int, photometric: str, cfg: IngestConfig
) -> tuple[np.ndarray, Literal["voi", "voi_lut", "percentile", "dtype"]]:
    """One decoded frame → float32 ``[0, 1]`` greyscale, bright = dense."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        return rgb_to_grey(rgb, float(np.iinfo(rgb.dtype).max)), "dtype"
    if raw.ndim == 3:
        # pydicom has already converted YBR to RGB; scale by the stored range before reducing.
        return rgb_to_grey(raw, _stored_max(ds, raw.dtype)), "dtype"

    values = _apply_modality(raw, ds, frame)
    grey, kind = _apply_voi(values, ds, frame, cfg)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 displays its minimum as white; invert after the VOI, as the display pipeline does.
        grey = 1.0 - grey
    return grey, kind


def _stored_max(ds: Dataset, dtype: np.dtype[Any]) -> float:
    if not np.issubdtype(dtype, np.integer):
        return 1.0
    dtype_bits = np.iinfo(dtype).bits
    bits = _positive_int(ds.get("BitsStored"))
    return float(2**bits - 1) if bits is not None and bits <= dtype_bits else float(np.iinfo(dtype).max)


def _functional_group_value(ds: Dataset, frame: int, sequence: str, attribute: str) -> Any:
    """An attribute from the per-frame, then shared functional groups (enhanced MF), else top level."""
    for groups_kw, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_kw)
        if groups and index < len(groups):
            items = groups[index].get(sequence)
            if items and attribute in items[0]:
                return items[0].get(attribute)
    return ds.get(attribute)


def _apply_modality(raw: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """Stored values → modality values (e.g. Hounsfield units)."""
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return np.asarray(apply_modality_lut(raw, ds))
    slope = _float(_functional_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _float(
        _functional_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    if slope is None and intercept is None:
        return raw
    return raw.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)


def _apply_voi(
    values: np.ndarray, ds: Dataset, frame: int, cfg: IngestConfig
) -> tuple[np.ndarray, Literal["voi", "voi_lut", "percentile"]]:
    """Modality values → ``[0, 1]`` with the file's first VOI LUT, else its first window, else percentiles."""
    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        # VOI LUTs index integers; modality values from a rescale are floats on an integer grid.
        ints = np.rint(values).astype(np.int64) if not np.issubdtype(values.dtype, np.integer) else values
        descriptor = [int(v) for v in lut[0].LUTDescriptor]
        entries = descriptor[0] or 2**16
        first = descriptor[1]
        out = apply_voi(ints, ds, 0)
        # Normalise by the range the LUT actually spans: many 16-bit LUTs hold 12-bit values, and the
        # nominal 2**bits range would render them nearly black.
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, 0)
        lo, hi = float(table.min()), float(table.max())
        if hi > lo:
            return window(out, lo, hi), "voi_lut"

    center = _first_float(_functional_group_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_functional_group_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    function = (
        _text(_functional_group_value(ds, frame, "FrameVOILUTSequence", "VOILUTFunction")) or "LINEAR"
    ).upper()
    if center is not None and width is not None:
        windowed = _window_center_width(values, center, width, function)
        if windowed is not None:
            return windowed, "voi"
    return percentile_window(values, cfg.percentile_window), "percentile"


def _window_center_width(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """The DICOM VOI functions (PS3.3 C.11.2.1.2) mapped to ``[0, 1]``; None when the window is unusable."""
    if function == "LINEAR":
        if width < 1:
            return None
        if width == 1:
            # Degenerate linear window: a threshold at center - 0.5.
            return (values > center - 0.5).astype(np.float32)
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped: the standard's half-pixel offset form.
        low = center - 0.5 - (width - 1) / 2
        return window(values, low, low + (width - 1))
    if function == "LINEAR_EXACT":
        return window(values, center - width / 2, center + width / 2) if width > 0 else None
    if function == "SIGMOID":
        if width <= 0:
            return None
        z = np.clip(-4.0 * (values.astype(np.float64) - center) / width, -80.0, 80.0)
        # NaN pixels (float pixel data) pass through clip and exp; they are shown black, as window() does.
        return np.nan_to_num((1.0 / (1.0 + np.exp(z))).astype(np.float32), copy=False, nan=0.0)
    return None


def _dicom_meta(
    ds: Dataset,
    ts: pydicom.uid.UID,
    sop_name: str | None,
    modality: str | None,
    photometric: str,
    rows: int,
    cols: int,
) -> dict[str, Any]:
    meta = empty_meta("dicom")
    meta.update(
        modality=modality,
        photometric=photometric,
        orig_rows=rows,
        orig_cols=cols,
        pixel_spacing=_pixel_spacing(ds),
        bits_stored=_positive_int(ds.get("BitsStored")),
        # Transfer syntax and SOP class UIDs are standard constants naming an encoding and an object
        # type, not instance identifiers; their names are kept for provenance.
        transfer_syntax=known_uid_name(ts, "Transfer Syntax"),
        sop_class=sop_name,
        body_part=defined_term("body_part", ds.get("BodyPartExamined")),
        view_position=defined_term("view_position", ds.get("ViewPosition")),
    )
    return meta


def _pixel_spacing(ds: Dataset) -> list[float] | None:
    candidates = [ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            candidates.insert(0, measures[0].get("PixelSpacing"))
    for value in candidates:
        try:
            spacing = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(np.isfinite(s) and s > 0 for s in spacing):
            return spacing
    return None


def _ts_label(ts: pydicom.uid.UID) -> str:
    """The transfer syntax's standard name, for a reason; a private one is not spelled out."""
    return known_uid_name(ts, "Transfer Syntax") or "an unknown transfer syntax"


def _sop_class_uid(ds: Dataset) -> Any:
    """SOP Class UID from the data set, else from the File Meta (Media Storage SOP Class UID)."""
    file_meta = getattr(ds, "file_meta", None)
    return ds.get("SOPClassUID") or (
        file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    )


def _text(value: Any) -> str | None:
    """A short single-valued string attribute as plain ``str`` (JSON-safe), or None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    text = str(value).strip().strip("\x00").strip()
    return text[:64] or None


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _first_float(value: Any) -> float | None:
    """The first of a possibly multi-valued DS (WindowCenter/Width may list several windows)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return _float(value[0]) if value else None
    return _float(value)
