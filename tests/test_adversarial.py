"""Hostile inputs through the whole ingest: every file is accounted for, each rejection says what is wrong,
and nothing raises or exhausts memory.

Every hostile file is generated here, in ``tmp_path``: truncated and empty files, DICOM with lying headers,
wrong VRs, lying transfer syntaxes and corrupt compressed data, non-image objects, decompression bombs,
misleading extensions, symlink loops, pipes, unreadable files and file names that are not UTF-8.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    RTDoseStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from medvae.config import IngestConfig
from medvae.data import dicom_reader
from medvae.data import ingest as ingest_module
from medvae.data.ingest import FileResult, IngestReport, ingest
from medvae.data.readers import RejectedInput, decode_bytes
from medvae.data.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files

_INSTANCE = iter(range(1, 10**6))


# ============================================================================================= builders


def _dataset(pixels: np.ndarray, **attrs: Any) -> Dataset:
    """A small, valid MONOCHROME2 CT image, Explicit VR Little Endian, 8- or 16-bit as ``pixels`` is."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{next(_INSTANCE)}"  # distinct files, distinct content
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _scan(seed: int = 0, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (side, side), dtype=np.uint16)


def _write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _write_bare(ds: Dataset) -> bytes:
    """The data set alone: no preamble, no "DICM", no File Meta (as some archives store DICOM)."""
    ds = Dataset(ds)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def _write_claiming(ds: Dataset, ts: UID) -> bytes:
    """A file whose File Meta claims transfer syntax ``ts`` but whose data set is Explicit VR Little Endian
    holding whatever pixel data ``ds`` has: a transfer syntax that lies. pydicom refuses to write one, so
    the meta header and the body are written separately."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    head = DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue()


def _patch_vr(data: bytes, tag: tuple[int, int], vr: bytes) -> bytes:
    """Overwrite the two VR bytes of an Explicit VR Little Endian element, keeping its length and value."""
    group, elem = tag
    at = data.index(struct.pack("<HH", group, elem), 132)
    return data[: at + 4] + vr + data[at + 6 :]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _grey(seed: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def _png_bomb(side: int, bit_depth: int) -> bytes:
    """A greyscale PNG of ``side``×``side`` zeros: its IDAT inflates to side² pixels but compresses ~1000:1.

    Written chunk by chunk with zlib, one row at a time, so the test itself never holds the raw image.
    """
    row = bytes(1 + (side * bit_depth + 7) // 8)  # filter byte + packed zero samples
    deflater = zlib.compressobj(9)
    idat = b"".join(deflater.compress(row) for _ in range(side)) + deflater.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _corrupt_rle() -> bytes:
    """An RLE Lossless image whose first segment starts with a run longer than the segment.

    pylibjpeg-rle (Rust) panics on it with "index out of bounds"; found by benchmarks/fuzz_readers.py.
    """
    ds = _dataset(np.random.default_rng(5).integers(0, 4096, (6, 5), dtype=np.uint16))
    ds.compress(RLELossless)
    data = bytearray(_write(ds))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    first_segment = bytes(data).index(frame) + 64  # after the 64-byte RLE header
    data[first_segment] = 0x81  # "repeat the next byte 128 times" in a 30-byte segment
    return bytes(data)


def _write_bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    """Create a file whose name is raw bytes (not necessarily UTF-8), as a Linux file system allows."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
        fh.write(data)


def _hostile_tree(root: Path) -> dict[str, str | None]:
    """Write every hostile case under ``root``.

    Returns:
        File name → a fragment its rejection reason must contain, or None where it must be ingested.
    """
    root.mkdir(parents=True)
    good = _scan(1)
    cases: dict[str, tuple[bytes, str | None]] = {}

    # Controls: the same machinery ingests ordinary files.
    cases["good.dcm"] = (_write(_dataset(good, WindowCenter=2048, WindowWidth=4096)), None)
    cases["good.png"] = (_png(_grey(1)), None)

    # Truncated and empty files.
    whole = _write(_dataset(_scan(2, 64)))
    cases["truncated_in_pixels.dcm"] = (whole[: int(len(whole) * 0.7)], "less than expected")
    cases["truncated_in_header.dcm"] = (whole[:300], "truncated")
    png = _png(_grey(3, 64))
    cases["truncated.png"] = (png[: len(png) // 2], "truncated PNG")
    jpg = _jpeg(_grey(4, 64))
    cases["truncated.jpg"] = (jpg[: len(jpg) // 2], "truncated JPEG")
    cases["empty.dcm"] = (b"", "empty file (0 bytes)")
    cases["empty.png"] = (b"", "empty file (0 bytes)")
    cases["preamble_only.dcm"] = (b"\0" * 128 + b"DICM", "data set is empty or the file is truncated")

    # Wrong VRs: a Rows written as a decimal string, a BitsAllocated relabelled as a long string.
    rows_as_ds = _dataset(_scan(5))
    rows_as_ds["Rows"] = DataElement(0x00280010, "DS", "16.0")
    cases["rows_as_ds.dcm"] = (_write(rows_as_ds), "Rows is stored with VR DS")
    cases["bits_allocated_as_lo.dcm"] = (
        _patch_vr(_write(_dataset(_scan(6))), (0x0028, 0x0100), b"LO"),
        "BitsAllocated is stored with VR LO",
    )

    # Declared sizes that do not match the data.
    huge = _dataset(good)
    huge.Rows, huge.Columns = 60000, 60000
    cases["huge_declared.dcm"] = (_write(huge), "over max_pixels=64000000; not decoded")
    short = _dataset(_scan(7))
    short.PixelData = short.PixelData[:-4]
    cases["pixels_short.dcm"] = (_write(short), "less than expected")
    long = _dataset(_scan(8))
    long.PixelData = long.PixelData * 6
    cases["pixels_long.dcm"] = (_write(long), "5 whole frame(s) more than the 512 bytes")
    padded = _dataset(_scan(9))
    padded.PixelData = padded.PixelData + b"\0\0"  # less than a frame of excess: pydicom drops it
    cases["pixels_padded.dcm"] = (_write(padded), None)

    # Transfer syntaxes that lie, both ways.
    cases["says_jpeg_holds_raw.dcm"] = (
        _write_claiming(_dataset(_scan(10)), JPEGBaseline8Bit),
        "JPEG Baseline (Process 1) (compressed), but the pixel data is not encapsulated (no fragment "
        "items): it is stored uncompressed, or the File Meta Transfer Syntax UID is wrong",
    )
    raw8 = _grey(11, 16)
    # BurnedInAnnotation NO: the burned-in policy would refuse an undeclared Secondary Capture first.
    jpeg_in_raw = _dataset(
        raw8, SOPClassUID=SecondaryCaptureImageStorage, Modality="OT", BurnedInAnnotation="NO"
    )
    jpeg_in_raw["PixelData"] = DataElement(
        0x7FE00010, "OB", encapsulate([_jpeg(raw8)]), is_undefined_length=True
    )
    cases["says_raw_holds_jpeg.dcm"] = (
        _write_claiming(jpeg_in_raw, ExplicitVRLittleEndian),
        "compressed (encapsulated fragments), but the transfer syntax is Explicit VR Little Endian",
    )
    cases["corrupt_rle.dcm"] = (_corrupt_rle(), "cannot decode RLE Lossless pixel data: the decoder crashed")

    # Objects that are not scans.
    sr = _dataset(good, SOPClassUID=ComprehensiveSRStorage, Modality="SR")
    del sr.PixelData
    cases["report.dcm"] = (_write(sr), "no pixel data: Comprehensive SR Storage is not an image")
    pdf = _dataset(good, SOPClassUID=EncapsulatedPDFStorage, Modality="DOC")
    del pdf.PixelData
    pdf.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    cases["document.dcm"] = (_write(pdf), "no pixel data: Encapsulated PDF Storage is not an image")
    cases["dose.dcm"] = (
        _write(_dataset(_scan(12), SOPClassUID=RTDoseStorage, Modality="RTDOSE")),
        "policy: RT Dose Storage (Modality RTDOSE) is a radiotherapy dose grid",
    )
    cases["mask.dcm"] = (
        _write(_dataset(_scan(13), SOPClassUID=SegmentationStorage, Modality="SEG")),
        "policy: Segmentation Storage (Modality SEG) is a segmentation",
    )

    # Extensions that lie: the content decides, except for a bare data set, which has no magic at all.
    cases["png_named.dcm"] = (_png(_grey(14)), None)
    cases["dicom_named.png"] = (_write(_dataset(_scan(15))), None)
    cases["bare_dicom_named.png"] = (_write_bare(_dataset(_scan(16))), "not a DICOM, PNG or JPEG file")
    cases["text_named.dcm"] = (b"patient list, do not ingest\n" * 20, "do not parse as a DICOM data set")

    for name, (data, _) in cases.items():
        (root / name).write_bytes(data)
    expected: dict[str, str | None] = {name: reason for name, (_, reason) in cases.items()}

    # Links and special files.
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    expected["loop_a"] = expected["loop_b"] = "cannot read file: Too many levels of symbolic links"
    (root / "dangling.dcm").symlink_to(root / "gone.dcm")
    expected["dangling.dcm"] = "cannot read file: No such file or directory"
    (root / "back_to_root").symlink_to(root, target_is_directory=True)
    expected["back_to_root"] = "directory symlink not followed"
    os.mkfifo(root / "pipe.dcm")
    expected["pipe.dcm"] = "not a regular file (a named pipe)"

    # File names that are not UTF-8 (Latin-1 bytes, as from an old Windows share).
    _write_bytes_name(root, b"scan_\xe9t\xe9.png", _png(_grey(17)))
    expected[os.fsdecode(b"scan_\xe9t\xe9.png")] = None
    _write_bytes_name(root, b"r\xf6ntgen.dcm", b"\x00\x01\x02 not dicom at all " * 10)
    expected[os.fsdecode(b"r\xf6ntgen.dcm")] = "do not parse as a DICOM data set"
    return expected


def _by_name(report: IngestReport) -> dict[str, FileResult]:
    return {Path(f.path).name: f for f in report.files}


def _assert_accounted(report: IngestReport) -> None:
    c = report.counts
    assert c["ingested"] + c["rejected"] + c["skipped"] == c["seen"] == len(report.files)
    for f in report.files:
        if f.status != "ingested":
            reason = f.reason or ""
            # Human-readable: a sentence, not a traceback, a repr of a buffer or a bare exception name.
            assert len(reason) > 10, (f.path, reason)
            assert "Traceback" not in reason and "object at 0x" not in reason, (f.path, reason)
            assert not reason.startswith("unexpected decoder error"), (f.path, reason)


# ================================================================================================ tests


def test_hostile_tree_every_file_is_accounted_for_with_a_reason(tmp_path: Path) -> None:
    expected = _hostile_tree(tmp_path / "src")
    report = ingest([tmp_path / "src"], Store(tmp_path / "store"), IngestConfig(workers=1))

    _assert_accounted(report)
    got = _by_name(report)
    assert set(got) == set(expected), set(got) ^ set(expected)
    wrong = []
    for name, fragment in sorted(expected.items()):
        res = got[name]
        if fragment is None and res.status != "ingested":
            wrong.append(f"{name!r}: expected ingested, got {res.status}: {res.reason}")
        elif fragment is not None and (res.status != "rejected" or fragment not in (res.reason or "")):
            wrong.append(f"{name!r}: expected rejected with {fragment!r}, got {res.status}: {res.reason}")
    assert not wrong, "\n".join(wrong)

    n_ingested = sum(1 for v in expected.values() if v is None)
    assert report.counts["ingested"] == n_ingested and report.rows_added == n_ingested
    assert Store(tmp_path / "store").read().num_rows == n_ingested
    # The report (with its non-UTF-8 paths) is still writable and valid JSON.
    report.write(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["seen"] == len(expected)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_size_bombs_are_refused_from_the_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "bombs"
    src.mkdir()
    huge = _dataset(_scan(20))
    huge.Rows, huge.Columns = 60000, 60000  # 3.6e9 values declared; 512 bytes present
    (src / "huge.dcm").write_bytes(_write(huge))
    frames = _dataset(_scan(21))
    frames.NumberOfFrames = 1_000_000  # fine for "middle" (one frame decoded), not for "all"
    (src / "many_frames.dcm").write_bytes(_write(frames))
    (src / "bomb_1bit.png").write_bytes(_png_bomb(30000, 1))  # 9e8 pixels in ~110 KB: Pillow's guard
    (src / "bomb_8bit.png").write_bytes(_png_bomb(9000, 8))  # 8.1e7 pixels: medvae's own header check
    assert max(p.stat().st_size for p in src.iterdir()) < 200_000

    decoded: list[str] = []

    def record(what: str) -> Callable[..., Any]:
        def decoding(*_: Any, **__: Any) -> Any:
            decoded.append(what)
            raise AssertionError(f"{what} called: pixels decoded before the size check")

        return decoding

    monkeypatch.setattr(Image.Image, "load", record("Image.load"))
    monkeypatch.setattr(dicom_reader, "pixel_array", record("pixel_array"))
    monkeypatch.setattr(Dataset, "pixel_array", property(record("Dataset.pixel_array")))

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        report = ingest([src], Store(tmp_path / "store"), IngestConfig(workers=1, multiframe="all"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024

    assert decoded == []
    _assert_accounted(report)
    reasons = {name: f.reason or "" for name, f in _by_name(report).items()}
    assert all(f.status == "rejected" for f in report.files)
    assert "60000×60000×1 samples×1 frame(s)" in reasons["huge.dcm"]
    assert "×1000000 frame(s)" in reasons["many_frames.dcm"]
    assert "more pixels than max_pixels" in reasons["bomb_1bit.png"]
    assert "9000×9000 = 81000000 pixels" in reasons["bomb_8bit.png"]
    assert all("max_pixels=64000000" in r for r in reasons.values()), reasons
    # Any decode would have needed >= 81 MB (the 8-bit bomb) and up to 7 GB (the DICOM).
    assert peak < 64 * 2**20, f"traced Python/numpy peak {peak / 2**20:.0f} MiB"
    assert rss_growth_mib < 256, f"resident peak grew by {rss_growth_mib:.0f} MiB"


def test_unreadable_file_is_rejected_with_the_os_reason(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not apply (simulated in the next test instead)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "locked.png").write_bytes(_png(_grey(30)))
    (src / "locked.png").chmod(0)
    try:
        report = ingest([src], Store(tmp_path / "store"), IngestConfig(workers=1))
    finally:
        (src / "locked.png").chmod(0o600)
    _assert_accounted(report)
    (res,) = report.files
    assert res.status == "rejected" and res.reason == "cannot read file: Permission denied"


def test_unreadable_file_simulated_and_special_files_given_as_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root a chmod 000 file is still readable, so the read error is injected where ingest reads.
    src = tmp_path / "src"
    src.mkdir()
    (src / "locked.png").write_bytes(_png(_grey(31)))
    (src / "fine.png").write_bytes(_png(_grey(32)))
    real_open = open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if os.path.basename(file) == "locked.png":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # Where ingest opens a file to read it (a module global shadows the builtin there only).
    monkeypatch.setattr(ingest_module, "open", guarded_open, raising=False)
    # Given directly as sources (not found by walking a folder): a FIFO, a directory symlink loop, a
    # dangling link and a path that does not exist. Opening the FIFO would block forever; it must not be.
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "self_loop").symlink_to(tmp_path / "self_loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    sources = [src, tmp_path / "pipe", tmp_path / "self_loop", tmp_path / "dangling", tmp_path / "missing"]
    report = ingest(sources, Store(tmp_path / "store"), IngestConfig(workers=1))

    _assert_accounted(report)
    reasons = {name: (f.status, f.reason) for name, f in _by_name(report).items()}
    assert reasons == {
        "fine.png": ("ingested", None),
        "locked.png": ("rejected", "cannot read file: Permission denied"),
        "pipe": ("rejected", "not a regular file (a named pipe)"),
        "self_loop": ("rejected", "cannot read file: Too many levels of symbolic links"),
        "dangling": ("rejected", "cannot read file: No such file or directory"),
        "missing": ("rejected", "does not exist"),
    }


def test_non_utf8_names_in_files_and_label_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    _write_bytes_name(src / "normal", b"caf\xe9_1.png", _png(_grey(40)))  # Latin-1 file name
    legacy = os.path.join(os.fsencode(src), b"pneumon\xeda")  # Latin-1 folder name = label
    os.mkdir(legacy)
    _write_bytes_name(Path(os.fsdecode(legacy)), b"p1.png", _png(_grey(41)))
    # A patient pattern that captures the non-UTF-8 part of the name: its hash must not fail.
    cfg = IngestConfig(workers=1, patient_regex=r"^([^_]+)_")

    report = ingest([src], Store(tmp_path / "store"), cfg)

    _assert_accounted(report)
    got = _by_name(report)
    assert got[os.fsdecode(b"caf\xe9_1.png")].status == "ingested"
    label_case = got["p1.png"]
    assert label_case.status == "rejected"
    assert label_case.reason is not None and label_case.reason.startswith(
        "label folder name is not valid UTF-8"
    )
    table = Store(tmp_path / "store").read(columns=["label", "patient_key"]).to_pydict()
    assert table["label"] == ["normal"] and table["patient_key"][0] is not None
    # The folder name stays out of the store's lineage (reasons are tallied there).
    lineage = json.dumps(Store(tmp_path / "store").history()[0].lineage)
    assert "pneumon" not in lineage and "\\udced" not in lineage


# ===================================================================== extreme values, straight to decode


_VALUES = np.array([[0, 500, 1000, 1500], [2000, 2500, 3000, 4000]], dtype=np.uint16)


def _decode(ds: Dataset) -> np.ndarray:
    (img,) = decode_bytes(_write(ds), "extreme.dcm", IngestConfig())
    assert img.pixels.dtype == np.float32 and np.isfinite(img.pixels).all(), img.pixels
    assert img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0
    return img.pixels


def test_rescale_beyond_float32_range_gives_the_same_image() -> None:
    # Percentile windowing is invariant to a positive linear rescale, so slope 1e300 (values up to 4e303,
    # beyond float32) must give the image slope 1 gives; it used to come out all NaN.
    reference = _decode(_dataset(_VALUES, RescaleSlope=1, RescaleIntercept=0))
    for slope in ("1e300", "1e38", "3.5e38"):
        np.testing.assert_allclose(
            _decode(_dataset(_VALUES, RescaleSlope=slope, RescaleIntercept=0)), reference, atol=1e-6
        )


@pytest.mark.parametrize(
    ("center", "width", "expected"),
    [("1e300", "1e300", 0.0), ("-1e300", "1e300", 1.0), ("0", "1e39", 0.5)],
    ids=["window-far-above", "window-far-below", "window-wider-than-float32"],
)
def test_windows_beyond_float32_range(center: str, width: str, expected: float) -> None:
    np.testing.assert_allclose(
        _decode(_dataset(_VALUES, WindowCenter=center, WindowWidth=width)), expected, atol=1e-3
    )


@pytest.mark.parametrize("voi", [{}, {"WindowCenter": 1, "WindowWidth": 4}, {"VOILUTFunction": "SIGMOID"}])
def test_nan_in_float_pixel_data_comes_out_black(voi: dict[str, Any]) -> None:
    ds = _dataset(_VALUES)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    values = np.array([[0.0, np.nan, 1.0, 2.0], [3.0, np.inf, -np.inf, 1.5]], dtype="<f4")
    ds.FloatPixelData = values.tobytes()
    if voi.get("VOILUTFunction") == "SIGMOID":
        voi = {**voi, "WindowCenter": 1, "WindowWidth": 4}
    for key, value in voi.items():
        setattr(ds, key, value)
    pixels = _decode(ds)
    assert pixels[0, 1] == 0.0


def test_decoder_panic_is_a_rejection_not_a_crash() -> None:
    # pyo3's PanicException derives from BaseException: `except Exception` alone let it escape.
    with pytest.raises(RejectedInput, match=r"RLE Lossless pixel data: the decoder crashed \(PanicException"):
        decode_bytes(_corrupt_rle(), "corrupt_rle.dcm", IngestConfig())
