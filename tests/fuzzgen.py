"""Generators of hostile DICOM, PNG and JPEG bytes for fuzzing :func:`medvae.data.readers.decode_bytes`.

Shared by ``tests/data/test_fuzz.py`` (a bounded hypothesis run in CI) and ``benchmarks/fuzz_readers.py``
(a long campaign), so that a failure found by either is reproduced by the other from the same plan.

A case is described by a :class:`Plan`: which valid seed file to start from, and a list of mutations, each
named and carrying its own integer seed. :func:`build` turns a plan into bytes deterministically, so a plan
printed by the campaign (``repr(plan)``) is a complete reproducer. Everything here is pure: no file system,
no global random state.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from medvae.config import IngestConfig
from medvae.data.readers import DecodedImage, RejectedInput, decode_bytes

__all__ = [
    "MUTATORS",
    "NAMES",
    "Plan",
    "Violation",
    "build",
    "check_outcome",
    "mutator_names",
    "random_plan",
    "seed_indices",
    "seeds",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ================================================================================================ seeds


def _dicom(pixels: np.ndarray, ts: UID = ExplicitVRLittleEndian, **attrs: Any) -> Dataset:
    """A small, valid image data set: ``pixels`` is (rows, cols), (frames, rows, cols) or RGB (rows, cols, 3),
    and its dtype sets BitsAllocated and PixelRepresentation."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "CT"
    ds.PatientID = "FUZZ-1"
    frames = pixels.shape[0] if pixels.ndim == 3 and pixels.shape[-1] != 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.shape[-1] == 3 else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if pixels.shape[-1] == 3 else 1
    ds.PhotometricInterpretation = "RGB" if ds.SamplesPerPixel == 3 else "MONOCHROME2"
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    order = ">" if ts == ExplicitVRBigEndian else "<"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(order)).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _write(ds: Dataset, *, preamble: bool = True) -> bytes:
    buf = io.BytesIO()
    if preamble:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        # A bare data set, as some archives store it: no preamble, no File Meta; sniffed by name.
        ds = Dataset(ds)
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _dicom_seeds() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 4096, (6, 5), dtype=np.uint16)
    out: list[tuple[str, bytes]] = [
        ("ct16.dcm", _write(_dicom(u16, WindowCenter=2048, WindowWidth=4096))),
        (
            "ct_rescale.dcm",
            _write(_dicom(u16.astype(np.int16) - 1024, RescaleSlope=1, RescaleIntercept=-1024)),
        ),
        ("implicit8.dcm", _write(_dicom(u16.astype(np.uint8), ImplicitVRLittleEndian))),
        ("bigendian.dcm", _write(_dicom(u16, ExplicitVRBigEndian, SOPClassUID=MRImageStorage))),
        (
            "mono1_sigmoid.dcm",
            _write(
                _dicom(
                    u16,
                    PhotometricInterpretation="MONOCHROME1",
                    SOPClassUID=DigitalXRayImageStorageForPresentation,
                    Modality="DX",
                    WindowCenter=1000,
                    WindowWidth=500,
                    VOILUTFunction="SIGMOID",
                )
            ),
        ),
        ("rgb.dcm", _write(_dicom(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)))),
        ("multiframe.dcm", _write(_dicom(rng.integers(0, 4096, (3, 4, 4), dtype=np.uint16)))),
        ("no_meta.dcm", _write(_dicom(u16), preamble=False)),
    ]
    # A VOI LUT sequence (the LUT path of the VOI stage).
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.add_new(0x00283006, "US", [min(v * 4, 1000) for v in range(256)])  # LUTData
    out.append(("voilut.dcm", _write(_dicom(u16 % 256, VOILUTSequence=Sequence([lut])))))
    # Palette colour with its three LUTs.
    pal = _dicom(u16.astype(np.uint8) % 16, PhotometricInterpretation="PALETTE COLOR")
    for colour, tag in (("Red", 0x00281201), ("Green", 0x00281202), ("Blue", 0x00281203)):
        setattr(pal, f"{colour}PaletteColorLookupTableDescriptor", [16, 0, 16])
        pal.add_new(tag, "OW", np.arange(16, dtype="<u2").tobytes())
    out.append(("palette.dcm", _write(pal)))
    # 32-bit float pixel data (parametric maps).
    flt = _dicom(u16)
    del flt.PixelData
    flt.BitsAllocated = 32
    del flt.BitsStored, flt.HighBit, flt.PixelRepresentation
    flt.FloatPixelData = (u16.astype("<f4") / 7.0).tobytes()
    out.append(("float.dcm", _write(flt)))
    # Compressed: JPEG baseline (encapsulated, as a scanner writes it) and RLE (pydicom's own encoder).
    grey8 = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    # BurnedInAnnotation NO: a Secondary Capture must declare it to pass the default burned-in policy.
    jpg = _dicom(
        grey8,
        JPEGBaseline8Bit,
        SOPClassUID=SecondaryCaptureImageStorage,
        Modality="OT",
        BurnedInAnnotation="NO",
    )
    jpg["PixelData"] = DataElement(
        0x7FE00010, "OB", encapsulate([_jpeg(Image.fromarray(grey8))]), is_undefined_length=True
    )
    out.append(("jpeg.dcm", _write(jpg)))
    rle = _dicom(u16)
    rle.compress(RLELossless)
    out.append(("rle.dcm", _write(rle)))
    return out


def _raster_seeds() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    pal = Image.fromarray(grey % 4, "L").convert("P")
    return [
        ("grey.png", _png(Image.fromarray(grey, "L"))),
        ("grey16.png", _png(Image.fromarray(rng.integers(0, 4096, (5, 6), dtype=np.uint16)))),
        ("rgb.png", _png(Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), "RGB"))),
        ("la.png", _png(Image.fromarray(rng.integers(0, 256, (4, 4, 2), dtype=np.uint8), "LA"))),
        ("bilevel.png", _png(Image.fromarray(grey > 128))),
        ("palette_trns.png", _png(pal, transparency=0)),
        ("interlaced.png", _png(Image.fromarray(grey, "L"), optimize=False, interlace=1)),
        ("grey.jpg", _jpeg(Image.fromarray(np.kron(grey, np.ones((4, 4), np.uint8)), "L"))),
        ("rgb.jpg", _jpeg(Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8), "RGB"))),
    ]


@lru_cache(maxsize=1)
def seeds() -> tuple[tuple[str, bytes], ...]:
    """Every valid seed file as ``(name, bytes)``: DICOM first, then PNG and JPEG. Built once and cached."""
    return tuple(_dicom_seeds() + _raster_seeds())


# ============================================================================================ mutators

# Values that tend to sit on a boundary of some arithmetic: zero, one, sign bits, all-ones, huge.
_INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 256, 4095, 32767, 32768, 65535)
_INTERESTING_STRINGS = (
    "",
    "0",
    "-1",
    "1e300",
    "-1e300",
    "1e38",
    "3.5e38",
    "nan",
    "inf",
    "-0",
    "65536",
    "2147483647",
    "1000000000",
    "abc",
    "1\\2\\3",
    "\x00" * 4,
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL_422",
    "PALETTE COLOR",
    "SIGMOID",
    "LINEAR_EXACT",
    "YES",
    "RTDOSE",
    "SEG",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2",
    "1.2.840.10008.5.1.4.1.1.66.4",
)
# Attributes that the reader consults, by tag, with the VR pydicom would use.
_DICOM_TAGS: tuple[tuple[int, str], ...] = (
    (0x00020010, "UI"),  # TransferSyntaxUID
    (0x00080016, "UI"),  # SOPClassUID
    (0x00080060, "CS"),  # Modality
    (0x00280002, "US"),  # SamplesPerPixel
    (0x00280004, "CS"),  # PhotometricInterpretation
    (0x00280006, "US"),  # PlanarConfiguration
    (0x00280008, "IS"),  # NumberOfFrames
    (0x00280010, "US"),  # Rows
    (0x00280011, "US"),  # Columns
    (0x00280100, "US"),  # BitsAllocated
    (0x00280101, "US"),  # BitsStored
    (0x00280102, "US"),  # HighBit
    (0x00280103, "US"),  # PixelRepresentation
    (0x00281050, "DS"),  # WindowCenter
    (0x00281051, "DS"),  # WindowWidth
    (0x00281052, "DS"),  # RescaleIntercept
    (0x00281053, "DS"),  # RescaleSlope
    (0x00281056, "CS"),  # VOILUTFunction
    (0x00280301, "CS"),  # BurnedInAnnotation
    (0x00283010, "SQ"),  # VOILUTSequence
    (0x00283000, "SQ"),  # ModalityLUTSequence
    (0x00281101, "US"),  # RedPaletteColorLookupTableDescriptor
    (0x00281201, "OW"),  # RedPaletteColorLookupTableData
    (0x00281203, "OW"),  # BluePaletteColorLookupTableData
    (0x00280030, "DS"),  # PixelSpacing
    (0x7FE00010, "OB"),  # PixelData
)
_VRS = ("AE", "CS", "DS", "FD", "FL", "IS", "LO", "OB", "OW", "SH", "SL", "SQ", "SS", "UI", "UL", "UN", "US")


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _set_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(buf))
        width = rng.choice((1, 2, 4))
        value = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        buf[i : i + width] = bytes([value]) * width
    return bytes(buf)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    # Biased towards the interesting cuts: inside the header, and just short of the end.
    cut = rng.choice(
        (rng.randrange(len(data)), rng.randrange(min(len(data), 400)), len(data) - rng.randint(1, 8))
    )
    return data[: max(cut, 0)]


def _splice(data: bytes, rng: random.Random) -> bytes:
    """Delete, duplicate or insert a chunk, or graft the tail of another seed onto this head."""
    i = rng.randrange(len(data) + 1)
    j = min(len(data), i + rng.randint(1, 64))
    op = rng.randrange(4)
    if op == 0:
        return data[:i] + data[j:]
    if op == 1:
        return data[:j] + data[i:j] + data[j:]
    if op == 2:
        return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]
    _, other = rng.choice(seeds())
    k = rng.randrange(len(other) + 1)
    return data[:i] + other[k:]


def _append(data: bytes, rng: random.Random) -> bytes:
    """Trailing bytes: more pixel data than declared, or garbage after the end of the image."""
    return data + rng.choice((b"\x00", b"\x00" * rng.randint(2, 4096), rng.randbytes(rng.randint(1, 512))))


def _random_body(data: bytes, rng: random.Random) -> bytes:
    """Keep the magic (DICOM preamble + DICM, PNG signature, JPEG SOI) and replace the rest with noise."""
    head = 132 if data[128:132] == b"DICM" else 8 if data.startswith(_PNG_SIGNATURE) else 3
    return data[:head] + rng.randbytes(rng.randint(0, 2048))


def _dicom_raw_tag(data: bytes, rng: random.Random) -> bytes:
    """Overwrite the VR, length or value bytes of an attribute the reader uses, found by its tag bytes.

    Works on the encoded bytes, so it also produces what no writer would: wrong VRs, lengths that run past
    the end of the file, odd lengths.
    """
    tag, _ = rng.choice(_DICOM_TAGS)
    group, elem = tag >> 16, tag & 0xFFFF
    needle = rng.choice((struct.pack("<HH", group, elem), struct.pack(">HH", group, elem)))
    at = data.find(needle, 128 if group != 0x0002 else 0)
    if at < 0:
        return _set_bytes(data, rng) if data else data
    buf = bytearray(data)
    pos = at + 4
    what = rng.randrange(3)
    if what == 0:  # a wrong VR
        buf[pos : pos + 2] = rng.choice(_VRS).encode()
    elif what == 1:  # a lying length (16- and 32-bit length fields alike)
        buf[pos + 2 : pos + 4] = struct.pack("<H", rng.choice((0, 1, 2, 3, 0xFFFF, rng.randrange(65536))))
        if rng.random() < 0.5:
            buf[pos : pos + 4] = struct.pack("<I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(2**32))))
    else:  # random value bytes
        span = rng.randint(1, 8)
        buf[pos + 4 : pos + 4 + span] = rng.randbytes(span)
    return bytes(buf)


def _dicom_set_attribute(data: bytes, rng: random.Random) -> bytes:
    """Parse, set one attribute to an odd value (possibly under a wrong VR), and write it back."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        tag, vr = rng.choice(_DICOM_TAGS)
        if rng.random() < 0.3:
            vr = rng.choice(_VRS)  # a wrong VR: the writer encodes the value the way the VR says
        if vr in ("US", "SS", "UL", "SL"):
            value: Any = rng.choice((*_INTERESTING_INTS, rng.randrange(65536)))
            if vr in ("UL", "SL") and rng.random() < 0.3:
                value = rng.choice((2**31 - 1, 2**32 - 1))
        elif vr in ("FD", "FL"):
            value = rng.choice((0.0, -1.0, 1e300, float("nan"), float("inf"), rng.random() * 1e5))
        elif vr in ("OB", "OW", "UN"):
            value = rng.randbytes(rng.choice((0, 1, 2, 16, 100)))
        elif vr == "SQ":
            # A VOI or Modality LUT item whose descriptor and data may disagree.
            item = Dataset()
            item.LUTDescriptor = [
                rng.choice(_INTERESTING_INTS),
                rng.choice(_INTERESTING_INTS),
                rng.choice((8, 16)),
            ]
            item.add_new(0x00283006, "US", [rng.randrange(65536) for _ in range(rng.randint(0, 8))])
            if rng.random() < 0.3:
                item.ModalityLUTType = "HU"
            value = Sequence([item] * rng.randint(0, 2))
        else:
            value = rng.choice(_INTERESTING_STRINGS)
        if tag >> 16 == 0x0002:
            ds.file_meta[tag] = DataElement(tag, vr, value)
        elif rng.random() < 0.1 and tag in ds:
            del ds[tag]
        else:
            ds[tag] = DataElement(tag, vr, value)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=False)
        return buf.getvalue()
    except Exception:
        # Values the writer itself refuses are still worth trying as bytes.
        return _dicom_raw_tag(data, rng)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks = []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(_PNG_SIGNATURE)
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return bytes(out)


def _png_chunk_mutation(data: bytes, rng: random.Random) -> bytes:
    """Rewrite PNG chunks with valid CRCs, so that the damage reaches the decoder, not the CRC check.

    IHDR fields (size, depth, colour type, interlace), decompression bombs in IDAT, chunks dropped,
    duplicated or added (palette, transparency, compressed text, ICC profile).
    """
    if not data.startswith(_PNG_SIGNATURE):
        return _flip_bits(data, rng) if data else data
    chunks = _png_chunks(data)
    if not chunks:
        return data
    op = rng.randrange(5)
    if op == 0 and chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13:
        w, h, depth, colour, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
        field_ = rng.randrange(5)
        if field_ == 0:
            w = rng.choice((0, 1, (w + 1) % 2**32, 2**31 - 1, 2**32 - 1, rng.randrange(1, 10000)))
        elif field_ == 1:
            h = rng.choice((0, 1, (h + 1) % 2**32, 2**31 - 1, 2**32 - 1, rng.randrange(1, 10000)))
        elif field_ == 2:
            depth = rng.choice((0, 1, 2, 4, 8, 16, 32, 255))
        elif field_ == 3:
            colour = rng.choice((0, 1, 2, 3, 4, 6, 7, 255))
        else:
            inter = rng.choice((0, 1, 2))
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, comp, filt, inter))
    elif op == 1:
        # A bomb: many rows of zeros in a tiny IDAT, under a header that declares them.
        side = rng.choice((100, 3000, 9000, 30000))
        ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
        compressor = zlib.compressobj(9)
        row = b"\x00" * (side + 1)
        body = b"".join(compressor.compress(row) for _ in range(min(side, 200))) + compressor.flush()
        chunks = [(b"IHDR", ihdr), (b"IDAT", body), (b"IEND", b"")]
    elif op == 2:
        del chunks[rng.randrange(len(chunks))]
    elif op == 3:
        i = rng.randrange(len(chunks))
        chunks.insert(i, chunks[i])
    else:
        kind, body = rng.choice(
            (
                (b"PLTE", rng.randbytes(rng.choice((0, 3, 5, 768, 771)))),
                (b"tRNS", rng.randbytes(rng.choice((0, 1, 2, 6, 300)))),
                (b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * rng.choice((10, 2_000_000)))),
                (b"iCCP", b"icc\x00\x00" + zlib.compress(rng.randbytes(64))),
                (b"sBIT", rng.randbytes(rng.randint(0, 4))),
                (b"eXIf", b"MM\x00*" + rng.randbytes(rng.randint(0, 64))),
                (rng.randbytes(4), rng.randbytes(rng.randint(0, 32))),
            )
        )
        chunks.insert(rng.randint(1, len(chunks)), (kind, body))
    return _png_join(chunks)


# Name → mutator. Every mutator maps (bytes, Random) → bytes and never raises on any input.
MUTATORS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip_bits": _flip_bits,
    "set_bytes": _set_bytes,
    "truncate": _truncate,
    "splice": _splice,
    "append": _append,
    "random_body": _random_body,
    "dicom_raw_tag": _dicom_raw_tag,
    "dicom_set_attribute": _dicom_set_attribute,
    "png_chunk": _png_chunk_mutation,
}
# File names a case may be given: the real one, or one that lies about the format.
NAMES = ("keep", "scan.dcm", "scan.png", "scan.jpg", "IM000001", "1.2.840.113619.2.55", "notes.txt")


# ================================================================================================ plans


@dataclass(frozen=True)
class Plan:
    """A reproducible fuzz case: a seed file, a file name, and the mutations applied in order.

    ``repr(plan)`` is valid Python for rebuilding it: ``build(Plan(...))``.
    """

    seed: int
    name: str = "keep"
    mutations: tuple[tuple[str, int], ...] = field(default_factory=tuple)


def build(plan: Plan) -> tuple[str, bytes]:
    """The file name and bytes that ``plan`` describes.

    Args:
        plan: the case; ``plan.seed`` indexes :func:`seeds` (modulo their number).

    Returns:
        ``(name, data)`` ready for :func:`medvae.data.readers.decode_bytes`.
    """
    all_seeds = seeds()
    name, data = all_seeds[plan.seed % len(all_seeds)]
    for mutator, mseed in plan.mutations:
        if data:
            data = MUTATORS[mutator](data, random.Random(mseed))
    return (name if plan.name == "keep" else plan.name), data


# How often each mutator is drawn, by seed kind. Mutations that keep the container parseable
# (attributes set to odd values, PNG chunks rewritten with valid CRCs) reach the pixel pipeline; raw byte
# damage mostly exercises the parsers. Both matter, so both are drawn.
_WEIGHTS: dict[str, dict[str, float]] = {
    "dicom": {
        "flip_bits": 1,
        "set_bytes": 1,
        "truncate": 1,
        "splice": 1,
        "append": 1,
        "random_body": 0.3,
        "dicom_raw_tag": 3,
        "dicom_set_attribute": 6,
    },
    "raster": {
        "flip_bits": 2,
        "set_bytes": 2,
        "truncate": 1,
        "splice": 1,
        "append": 1,
        "random_body": 0.3,
        "png_chunk": 4,
    },
}


def seed_indices(kind: str) -> list[int]:
    """Indices into :func:`seeds` of one kind: ``"dicom"`` or ``"raster"`` (PNG and JPEG)."""
    return [i for i, (name, _) in enumerate(seeds()) if name.endswith(".dcm") == (kind == "dicom")]


def mutator_names(kind: str) -> list[str]:
    """The mutators drawn for seeds of ``kind`` (``"dicom"`` or ``"raster"``), in a stable order."""
    return sorted(_WEIGHTS[kind])


def random_plan(rng: random.Random, *, max_mutations: int = 3) -> Plan:
    """Draw a plan: any seed, usually its own name, one to ``max_mutations`` mutations suited to its kind.

    Args:
        rng: the source of randomness (the campaign seeds it, so runs are reproducible).
        max_mutations: the most mutations to stack.

    Returns:
        A :class:`Plan`.
    """
    all_seeds = seeds()
    seed = rng.randrange(len(all_seeds))
    weights = _WEIGHTS["dicom" if all_seeds[seed][0].endswith(".dcm") else "raster"]
    name = "keep" if rng.random() < 0.85 else rng.choice(NAMES)
    n = rng.choice((1, 1, 1, 2, 2, max_mutations))
    drawn = rng.choices(tuple(weights), weights=tuple(weights.values()), k=n)
    return Plan(seed, name, tuple((m, rng.randrange(2**32)) for m in drawn))


def _check_image(img: DecodedImage) -> str | None:
    px = img.pixels
    if not isinstance(px, np.ndarray) or px.ndim != 2 or px.dtype.kind != "f":
        return f"pixels are not a 2-D float array: {type(px).__name__} {getattr(px, 'shape', None)}"
    if px.size == 0:
        return f"empty image {px.shape}"
    if not np.isfinite(px).all():
        return f"non-finite pixels ({int((~np.isfinite(px)).sum())} of {px.size})"
    if px.min() < 0.0 or px.max() > 1.0:
        return f"pixels outside [0, 1]: [{px.min()}, {px.max()}]"
    return None


@dataclass(frozen=True)
class Violation:
    """How one case broke the reader's contract.

    ``kind`` is ``"exception"`` (something other than RejectedInput escaped) or ``"image"`` (a decoded
    image broke an invariant); ``message`` says what, in one line.
    """

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def check_outcome(data: bytes, name: str, cfg: IngestConfig | None = None) -> Violation | None:
    """Decode ``data`` and judge the outcome against the reader's contract.

    The only allowed outcomes are a non-empty list of images (each 2-D float in ``[0, 1]``, finite) or a
    :class:`RejectedInput` with a non-empty reason. Anything else is a bug.

    Args:
        data: the file bytes.
        name: the file name given to the reader.
        cfg: the ingest settings; defaults to ``IngestConfig()``.

    Returns:
        None when the outcome is allowed, else the :class:`Violation`.
    """
    try:
        images = decode_bytes(data, name, cfg or IngestConfig())
    except RejectedInput as exc:
        return None if exc.reason.strip() else Violation("image", "RejectedInput with an empty reason")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        # BaseException, not Exception: a Rust decoder's panic arrives as pyo3's PanicException, which
        # derives from BaseException, and is exactly the kind of escape this check exists to find.
        return Violation("exception", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    if not isinstance(images, list) or not images:
        return Violation("image", f"decode_bytes returned {images!r} instead of a non-empty list of images")
    for img in images:
        problem = _check_image(img)
        if problem:
            return Violation("image", problem)
    return None
