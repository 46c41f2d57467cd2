"""Tests for decoding DICOM, PNG and JPEG files into windowed greyscale images (medvae.data.readers)."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medvae.config import IngestConfig
from medvae.data import dicom_reader
from medvae.data.readers import (
    META_KEYS,
    DecodedImage,
    RejectedInput,
    decode_bytes,
    decode_file,
    sniff_format,
)

# Decoding mechanics are tested with the burned-in policy for risky kinds (SC, US, OT) off, since many
# fixtures are such files without BurnedInAnnotation NO; the policy itself is tested with the defaults.
CFG = IngestConfig(burned_in_unless_declared=())
DEFAULT = IngestConfig()
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom_fixtures"
FIXTURES_TSV = FIXTURES / "FIXTURES.tsv"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about odd-but-legal values


def _check_image(img: DecodedImage, rows: int, cols: int) -> None:
    """Invariants every decoded image must satisfy."""
    assert img.pixels.dtype == np.float32
    assert img.pixels.ndim == 2
    assert np.isfinite(img.pixels).all()
    assert img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0
    assert img.meta["orig_rows"] == rows and img.meta["orig_cols"] == cols
    assert set(img.meta) == META_KEYS
    json.dumps(img.meta)  # must be JSON-serialisable as is


# ================================================================================================ PNG


def _png(img: Image.Image, **save_kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save_kw)
    return buf.getvalue()


def _decode_png(tmp_path: Path, img: Image.Image, **save_kw: Any) -> DecodedImage:
    path = tmp_path / "scan.png"
    path.write_bytes(_png(img, **save_kw))
    (out,) = decode_file(path, CFG)
    assert out.meta["source_format"] == "png"
    assert out.patient_ref is None and out.frame_index == 0 and out.n_frames == 1
    return out


def test_png_8bit_grey_is_scaled_by_255(tmp_path: Path) -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(8, 32)
    out = _decode_png(tmp_path, Image.fromarray(arr))
    _check_image(out, 8, 32)
    np.testing.assert_allclose(out.pixels, arr / 255.0, atol=1e-7)
    assert out.meta["window"] == "dtype" and out.meta["bits_stored"] == 8


def test_png_16bit_gradient_is_percentile_windowed(tmp_path: Path) -> None:
    arr = np.linspace(0, 4095, 40 * 64).astype(np.uint16).reshape(40, 64)  # 12-bit data in 16 bits
    out = _decode_png(tmp_path, Image.fromarray(arr))
    _check_image(out, 40, 64)
    assert out.meta["window"] == "percentile" and out.meta["bits_stored"] == 16
    # Windowed on its own range, not divided by 65535 (which would leave it at most 0.06).
    assert out.pixels.min() == 0.0 and out.pixels.max() == 1.0
    assert out.pixels[20, 32] == pytest.approx(0.5, abs=0.02)
    assert (np.diff(out.pixels.ravel()) >= 0).all()  # monotone, like the gradient


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("RGB", (6, 4), (255, 0, 0)), 0.299),
        (lambda: Image.new("RGB", (6, 4), (0, 255, 0)), 0.587),
        (lambda: Image.new("RGB", (6, 4), (77, 77, 77)), 77 / 255),
        (lambda: Image.new("RGBA", (6, 4), (255, 0, 0, 0)), 0.299),  # alpha ignored, even fully transparent
        (lambda: Image.new("RGB", (6, 4), (0, 0, 255)).convert("P"), 0.114),
        (lambda: Image.new("LA", (6, 4), (100, 3)), 100 / 255),
    ],
    ids=["rgb-red", "rgb-green", "rgb-grey", "rgba", "palette", "la"],
)
def test_png_colour_and_alpha_modes_reduce_to_luminance(tmp_path: Path, make: Any, expected: float) -> None:
    out = _decode_png(tmp_path, make())
    _check_image(out, 4, 6)
    np.testing.assert_allclose(out.pixels, expected, atol=1e-6)
    assert out.meta["window"] == "dtype"


def test_png_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("RGB", (5, 3), (255, 0, 0)).convert("P")
    out = _decode_png(tmp_path, img, transparency=0)
    _check_image(out, 3, 5)
    np.testing.assert_allclose(out.pixels, 0.299, atol=1e-6)
    assert out.meta["photometric"] == "PALETTE COLOR"


def test_png_1bit(tmp_path: Path) -> None:
    arr = np.indices((4, 6)).sum(axis=0) % 2 == 1
    out = _decode_png(tmp_path, Image.fromarray(arr))
    _check_image(out, 4, 6)
    np.testing.assert_array_equal(out.pixels, arr.astype(np.float32))
    assert out.meta["bits_stored"] == 1


# =============================================================================================== JPEG


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_jpeg_rgb_is_draft_downscaled_but_reports_original_size() -> None:
    data = _jpeg(Image.new("RGB", (1000, 700), (255, 0, 0)))
    (out,) = decode_bytes(data, "scan.jpeg", CFG)
    assert out.meta["source_format"] == "jpeg"
    _check_image(out, 700, 1000)
    rows, cols = out.pixels.shape
    # DCT-domain reduction happened (1/8 of 700 is 87.5), but never below the output side.
    assert rows < 700 and cols < 1000
    assert min(rows, cols) >= CFG.size
    np.testing.assert_allclose(out.pixels, 0.299, atol=0.01)  # the decoder's Y channel is BT.601 luma


def test_jpeg_grey_small_image_is_not_draft_reduced() -> None:
    # Half of 90 rows would fall below the 64 px output side, so no reduction may happen.
    data = _jpeg(Image.new("L", (150, 90), 100))
    (out,) = decode_bytes(data, "x.jpg", CFG)
    _check_image(out, 90, 150)
    assert out.pixels.shape == (90, 150)
    np.testing.assert_allclose(out.pixels, 100 / 255, atol=2 / 255)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_and_its_absence_changes_nothing(fmt: str) -> None:
    # A film photographed with a phone: stored 120 wide and 80 tall, EXIF says "rotate 90° CW" (6).
    # The bright band is on the stored image's left, so it ends up at the top once upright.
    stored = np.full((80, 120), 40, dtype=np.uint8)
    stored[:, :20] = 220
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    for orientation, want_shape in ((exif, (120, 80)), (None, (80, 120))):
        buf = io.BytesIO()
        img.save(buf, fmt, **({"exif": orientation} if orientation is not None else {}))
        (out,) = decode_bytes(buf.getvalue(), f"x.{fmt.lower()}", CFG)
        assert out.pixels.shape == want_shape
        bright = out.pixels > 0.5
        if orientation is not None:
            assert bright[:15].all() and not bright[25:].any()  # the band is now the top rows
        else:
            assert bright[:, :15].all() and not bright[:, 25:].any()


# ======================================================================================== bad inputs


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR claims another size (CRC fixed, so only the size is a lie)."""
    data = bytearray(_png(Image.new("L", (1, 1), 0)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr(dicom_reader, "pixel_array", boom)
    monkeypatch.setattr(Dataset, "pixel_array", property(boom))


def test_png_decompression_bomb_is_rejected_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_with_declared_size(100_000, 100_000)
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(RejectedInput, match=r"more pixels than max_pixels=64000000; not decoded"):
        decode_bytes(data, "bomb.png", CFG)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("max_pixels", [300, 100], ids=["own-check", "pillow-check"])
def test_png_over_configured_max_pixels_is_rejected_before_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_pixels: int
) -> None:
    # 400 pixels: at 300 our header check refuses it (Pillow only warns up to twice its limit); at 100
    # Pillow's own guard, aligned with the config, refuses it inside Image.open. Same outcome.
    path = tmp_path / "big.png"
    path.write_bytes(_png(Image.new("L", (20, 20), 5)))
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(
        RejectedInput, match=rf"(400 pixels.*over|more pixels than) max_pixels={max_pixels}; not"
    ):
        decode_file(path, IngestConfig(max_pixels=max_pixels))


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"", "empty.png", "empty file (0 bytes)"),
        (np.random.default_rng(1).bytes(500), "noise.bin", "not a DICOM, PNG or JPEG file"),
        (b"hello, world\n" * 20, "notes.txt", "not a DICOM, PNG or JPEG file"),
        (b"\x89PNG\r\n\x1a\n", "sig-only.png", "corrupt or truncated PNG header"),
    ],
    ids=["empty", "random", "text", "png-signature-only"],
)
def test_bad_bytes_are_rejected_with_reason(data: bytes, name: str, reason: str) -> None:
    with pytest.raises(RejectedInput) as exc:
        decode_bytes(data, name, CFG)
    assert reason in str(exc.value)
    assert exc.value.reason == str(exc.value)


def _nifti1_header() -> bytes:
    # A NIfTI-1 single-file header: sizeof_hdr 348 at offset 0, magic "n+1\\0" at 344, data from 352.
    head = bytearray(352)
    head[0:4] = (348).to_bytes(4, "little")
    head[344:348] = b"n+1\x00"
    return bytes(head) + bytes(64)


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (_nifti1_header(), "brain.nii", "a NIfTI volume"),
        (gzip.compress(_nifti1_header()), "brain.nii.gz", "a NIfTI volume"),
        (gzip.compress(b"hello"), "notes.txt.gz", "a gzip-compressed file"),
    ],
    ids=["nifti", "nifti-gz", "gzip"],
)
def test_volumes_and_archives_are_rejected_saying_what_they_are(data: bytes, name: str, reason: str) -> None:
    # An MRI research folder is NIfTI and gzip; the reason says what the file is and what to do with it.
    with pytest.raises(RejectedInput) as exc:
        decode_bytes(data, name, CFG)
    assert str(exc.value).startswith(reason)
    assert "first" in str(exc.value)


def test_truncated_png_and_jpeg_are_rejected() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    png = _png(Image.fromarray(noise))
    with pytest.raises(RejectedInput, match=r"^truncated PNG \(OSError raised by the decoder\)$"):
        decode_bytes(png[: len(png) // 2], "cut.png", CFG)
    jpg = _jpeg(Image.fromarray(noise))
    with pytest.raises(RejectedInput, match=r"^truncated JPEG"):
        decode_bytes(jpg[: len(jpg) // 2], "cut.jpg", CFG)


def test_random_bytes_named_dcm_are_rejected_as_dicom() -> None:
    with pytest.raises(RejectedInput, match="DICOM"):
        decode_bytes(np.random.default_rng(2).bytes(4000), "noise.dcm", CFG)


def test_decode_file_refuses_large_files_and_non_files(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(
        _png(Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 30), dtype=np.uint8)))
    )
    assert path.stat().st_size > 100
    with pytest.raises(RejectedInput, match="over max_file_bytes=100"):
        decode_file(path, IngestConfig(max_file_bytes=100))
    with pytest.raises(RejectedInput, match="not a regular file"):
        decode_file(tmp_path, CFG)
    with pytest.raises(RejectedInput, match="file not found"):
        decode_file(tmp_path / "missing.png", CFG)


def test_rejected_input_survives_pickling() -> None:
    # Decoding runs in worker processes; the reason must cross the process boundary intact.
    exc = pickle.loads(pickle.dumps(RejectedInput("empty file (0 bytes)")))
    assert isinstance(exc, RejectedInput) and exc.reason == "empty file (0 bytes)"


def test_sniff_format() -> None:
    assert sniff_format(b"\0" * 128 + b"DICM", "a.png") == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "a.dcm") == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"\0" * 10, "a") == "jpeg"
    assert sniff_format(b"\x01\x02\x03\x04" * 4, "IMG0001.DCM") == "dicom"  # extension fallback
    raw_dataset = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
    assert sniff_format(raw_dataset, "IM000001") == "dicom"  # extensionless: plausible first tag
    assert sniff_format(raw_dataset, "1.2.840.113619.2.55") == "dicom"  # UID-named
    assert sniff_format(b"\x01\x02\x03\x04" * 4, "IM000001") == "other"
    assert sniff_format(raw_dataset, "notes.txt") == "other"


# ========================================================================================= DICOM files


def _load_fixture_rows() -> list[dict[str, str]]:
    if not FIXTURES_TSV.exists():
        return []
    with FIXTURES_TSV.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


FIXTURE_ROWS = _load_fixture_rows()

# What must happen to each fixture: "ingest", or "reject:<text that must appear in the reason>".
EXPECTED: dict[str, str] = {
    "pydicom_test_files_CT_small.dcm": "ingest",
    "pydicom_test_files_MR_small.dcm": "ingest",
    "pydicom_test_files_MR_small_implicit.dcm": "ingest",
    "pydicom_test_files_MR_small_bigendian.dcm": "ingest",
    "pydicom_test_files_MR_small_RLE.dcm": "ingest",
    "pydicom_test_files_MR_small_jp2klossless.dcm": "ingest",
    "pydicom_test_files_MR_small_jpeg_ls_lossless.dcm": "ingest",
    "pydicom_test_files_JPGExtended.dcm": "ingest",
    "pydicom_test_files_SC_rgb_jpeg_dcmtk.dcm": "ingest",
    # An echo with the scanner's menu bar burned in along the bottom: the text screen sees it.
    "pydicom_test_files_examples_ybr_color.dcm": "reject:burned-in text suspected (a line of",
    "pydicom_test_files_examples_palette.dcm": "ingest",
    "pydicom_test_files_image_dfl.dcm": "ingest",
    # Not a valid no-meta file: it starts one byte early (a stray 0x20 from the removed meta header),
    # so every tag is misaligned and nothing parses.
    "pydicom_test_files_no_meta.dcm": "reject:no DICOM preamble or File Meta header",
    "pydicom_test_files_SC_rgb_small_odd.dcm": "ingest",
    "pydicom_test_files_rtdose.dcm": "reject:policy: RT Dose Storage (Modality RTDOSE) is a radiotherapy "
    "dose grid",
    "pydicom_test_files_liver_1frame.dcm": "reject:policy: Segmentation Storage (Modality SEG)",
    "pydicom_test_files_J2K_pixelrep_mismatch.dcm": "ingest",
    "pydicom_test_files_test-SR.dcm": "reject:no pixel data: Comprehensive SR Storage is not an image",
    "pydicom_test_files_MR_truncated.dcm": "reject:pixel data is 8130 bytes, less than expected",
    "pydicom_test_files_JPEG2000-embedded-sequence-delimiter.dcm": "reject:cannot decode JPEG 2000 Image "
    "Compression pixel data",
    "pydicom_data_store_emri_small.dcm": "ingest",
    "pydicom_data_store_JPGLosslessP14SV1_1s_1f_8b.dcm": "ingest",
    "pydicom_data_store_RG3_J2KI.dcm": "ingest",
    "pydicom_data_store_mlut_18.dcm": "ingest",
    # A SEG in a transfer syntax pydicom cannot decode: the policy refuses it before decoding is tried.
    "pydicom_data_store_liver_deflate.dcm": "reject:policy: Segmentation Storage (Modality SEG)",
    "highdicom_test_files_dx_image.dcm": "ingest",
    "pylibjpeg_data_JPEGLS_CT1_JLSN.dcm": "ingest",
    "pylibjpeg_data_JPEG2000_MAROTECH_CT_JP2Lossy.dcm": "ingest",
    "pylibjpeg_data_JPEG2000Lossless_TOSHIBA_J2K_SIZ1_PixRep0.dcm": "ingest",
    "nibabel_nicom_0.dcm": "ingest",
}

needs_fixtures = pytest.mark.skipif(
    not FIXTURES_TSV.exists(), reason=f"DICOM fixtures not found at {FIXTURES}"
)


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} not found in {FIXTURES}")
    return path


def _expected_size(row: dict[str, str]) -> tuple[int, int]:
    """Rows and columns from the TSV's decode column, e.g. 'OK (30, 240, 320, 3) uint8 [0,220]'."""
    decoded = row["decode_pydicom+pylibjpeg+gdcm"]
    shape = ast.literal_eval(decoded[decoded.index("(") : decoded.index(")") + 1])
    frames = int(row["Frames"] or 1)
    return (shape[1], shape[2]) if frames > 1 else (shape[0], shape[1])


@needs_fixtures
def test_expected_outcomes_cover_every_fixture() -> None:
    assert len(FIXTURE_ROWS) == 30
    assert {row["file"] for row in FIXTURE_ROWS} == set(EXPECTED)


@needs_fixtures
@pytest.mark.parametrize("row", FIXTURE_ROWS, ids=[row["file"] for row in FIXTURE_ROWS])
def test_dicom_fixture_outcome(row: dict[str, str]) -> None:
    name = row["file"]
    expected = EXPECTED[name]
    path = _fixture(name)
    if expected.startswith("reject:"):
        with pytest.raises(RejectedInput) as exc:
            decode_file(path, CFG)
        assert expected.removeprefix("reject:") in str(exc.value)
        return
    assert row["decode_pydicom+pylibjpeg+gdcm"].startswith("OK")
    rows, cols = _expected_size(row)
    (img,) = decode_file(path, CFG)
    _check_image(img, rows, cols)
    assert img.pixels.shape == (rows, cols)  # DICOM pixels keep their stored size
    assert img.meta["source_format"] == "dicom"
    assert img.meta["modality"] == row["Modality"]
    assert img.meta["window"] in {"voi", "voi_lut", "percentile", "dtype"}
    frames = int(row["Frames"] or 1)
    assert img.n_frames == frames and img.frame_index == frames // 2
    assert img.pixels.max() > img.pixels.min()  # real images have contrast after windowing


@needs_fixtures
def test_monochrome1_is_inverted_after_the_voi_window() -> None:
    path = _fixture("highdicom_test_files_dx_image.dcm")
    (img,) = decode_file(path, CFG)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert img.meta["photometric"] == "MONOCHROME1" and img.meta["window"] == "voi"
    assert np.corrcoef(img.pixels.ravel(), raw.ravel())[0, 1] < -0.99
    # WindowCenter 128 / WindowWidth 256 (LINEAR) maps 0..255 onto 0..1 exactly; then 1 - x.
    np.testing.assert_allclose(img.pixels, 1.0 - raw / 255.0, atol=1e-6)


def _roundtrip(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@needs_fixtures
def test_ct_rescale_gives_hounsfield_units_before_windowing() -> None:
    ds = pydicom.dcmread(_fixture("pydicom_test_files_CT_small.dcm"))
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    raw = ds.pixel_array.astype(np.float64)
    # A window given in HU, as a scanner writes it: it only fits if the rescale was applied first.
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 0, 2000, "LINEAR_EXACT"
    (img,) = decode_bytes(_roundtrip(ds), "ct.dcm", CFG)
    assert img.meta["window"] == "voi"
    hu = raw - 1024
    assert hu.min() < 0 < raw.min()  # the modality LUT moved the minimum below zero
    np.testing.assert_allclose(img.pixels, np.clip((hu + 1000) / 2000, 0, 1), atol=1e-6)
    assert not np.allclose(img.pixels, np.clip((raw + 1000) / 2000, 0, 1), atol=1e-3)


@needs_fixtures
def test_modality_lut_sequence_is_applied() -> None:
    path = _fixture("pydicom_data_store_mlut_18.dcm")
    (plain,) = decode_file(path, CFG)
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds and "RescaleSlope" not in ds
    # Reverse the LUT: if the decoder really maps stored values through it, the image inverts.
    item = ds.ModalityLUTSequence[0]
    item.LUTData = list(reversed(list(item.LUTData)))
    (flipped,) = decode_bytes(_roundtrip(ds), "mlut.dcm", CFG)
    assert np.corrcoef(plain.pixels.ravel(), flipped.pixels.ravel())[0, 1] < -0.99
    np.testing.assert_allclose(flipped.pixels, 1.0 - plain.pixels, atol=1e-3)


@needs_fixtures
def test_j2k_signed_codestream_under_unsigned_header_is_read_as_signed() -> None:
    # The codestream says signed 16-bit, the header says unsigned: CT padding of -2048 would become
    # 63488 and be painted white. Read as signed, the area outside the scan field is black.
    (img,) = decode_file(_fixture("pylibjpeg_data_JPEG2000Lossless_TOSHIBA_J2K_SIZ1_PixRep0.dcm"), CFG)
    assert img.pixels[0, 0] == 0.0 and img.pixels[-1, -1] == 0.0
    assert (img.pixels == 1.0).mean() < 0.01


@needs_fixtures
def test_multiframe_middle_and_all() -> None:
    path = _fixture("pydicom_data_store_emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    (middle,) = decode_file(path, CFG)
    assert (middle.frame_index, middle.n_frames) == (5, 10)
    everything = decode_file(path, IngestConfig(multiframe="all"))
    assert [i.frame_index for i in everything] == list(range(10))
    assert all(i.n_frames == 10 and i.pixels.shape == (64, 64) for i in everything)
    np.testing.assert_array_equal(everything[5].pixels, middle.pixels)
    # Frames are windowed independently, and each follows its own stored frame.
    for img, raw in zip(everything, frames, strict=True):
        assert np.corrcoef(img.pixels.ravel(), raw.ravel().astype(np.float64))[0, 1] > 0.99


@needs_fixtures
def test_colour_multiframe_ybr_is_reduced_to_luminance() -> None:
    path = _fixture("pydicom_test_files_examples_ybr_color.dcm")
    (img,) = decode_file(path, CFG.model_copy(update={"burned_in_text": "off"}))
    rgb = pydicom.pixels.pixel_array(pydicom.dcmread(path), index=15)  # pydicom converts YBR to RGB
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)
    assert img.meta["photometric"] == "YBR_FULL_422" and img.meta["window"] == "dtype"


@needs_fixtures
def test_dicom_without_file_meta_decodes_like_the_original() -> None:
    ds = pydicom.dcmread(_fixture("pydicom_test_files_CT_small.dcm"))
    (reference,) = decode_bytes(_roundtrip(ds), "ct.dcm", CFG)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw_dataset = buf.getvalue()
    assert raw_dataset[128:132] != b"DICM"
    for name in ("ct_no_meta.dcm", "IM000001"):
        (img,) = decode_bytes(raw_dataset, name, CFG)
        np.testing.assert_array_equal(img.pixels, reference.pixels)
        assert img.meta["transfer_syntax"] == "Explicit VR Little Endian"


# ===================================================================================== synthetic DICOM


def _synthetic_dicom(pixels: np.ndarray, **attrs: Any) -> Dataset:
    """A minimal MONOCHROME2 16-bit Explicit VR Little Endian CT image with the given attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


PIXELS = np.array([[0, 499, 500, 750], [1000, 1250, 1500, 4000]], dtype=np.uint16)


def test_synthetic_dicom_window_center_width() -> None:
    # LINEAR (PS3.3 C.11.2.1.2): c=1000.5, w=1001 → 0 at x <= 500, 1 at x > 1500, linear between.
    ds = _synthetic_dicom(
        PIXELS, WindowCenter=[1000.5, 40], WindowWidth=[1001, 400], BodyPartExamined="CHEST"
    )
    (img,) = decode_bytes(_roundtrip(ds), "synthetic.dcm", CFG)
    _check_image(img, 2, 4)
    assert img.meta["window"] == "voi"
    np.testing.assert_allclose(img.pixels, [[0, 0, 0, 0.25], [0.5, 0.75, 1, 1]], atol=1e-6)
    assert img.meta["body_part"] == "CHEST" and img.meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert img.meta["sop_class"] == "CT Image Storage" and img.meta["bits_stored"] == 16


def test_synthetic_dicom_unusable_window_falls_back_to_percentile() -> None:
    ds = _synthetic_dicom(PIXELS, WindowCenter=100, WindowWidth=0)
    (img,) = decode_bytes(_roundtrip(ds), "synthetic.dcm", CFG)
    assert img.meta["window"] == "percentile"
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0


def test_voi_lut_sequence_is_preferred_and_normalised_by_its_range() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(
        0x00283006, "US", [min(v // 2, 1000) for v in range(4096)]
    )  # LUTData  # spans 0..1000 of a nominal 16-bit range
    ds = _synthetic_dicom(PIXELS, WindowCenter=0, WindowWidth=10, VOILUTSequence=Sequence([lut]))
    (img,) = decode_bytes(_roundtrip(ds), "voilut.dcm", CFG)
    assert img.meta["window"] == "voi_lut"
    expected = np.minimum(PIXELS // 2, 1000) / 1000.0
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def test_enhanced_multiframe_functional_groups_rescale_and_window_per_frame() -> None:
    frames = np.array([[[0, 10], [20, 30]], [[0, 10], [20, 30]]], dtype=np.uint16)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -10
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    per_frame = []
    for center in (15.0, 35.0):  # frame windows in rescaled units: [0, 30] and [20, 50]
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = center, 30, "LINEAR_EXACT"
        item = Dataset()
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds = _synthetic_dicom(
        frames,
        NumberOfFrames=2,
        SharedFunctionalGroupsSequence=Sequence([shared]),
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
    )
    first, second = decode_bytes(_roundtrip(ds), "enhanced.dcm", IngestConfig(multiframe="all"))
    values = frames[0].astype(np.float64) * 2 - 10  # -10, 10, 30, 50
    np.testing.assert_allclose(first.pixels, np.clip(values / 30, 0, 1), atol=1e-6)
    np.testing.assert_allclose(second.pixels, np.clip((values - 20) / 30, 0, 1), atol=1e-6)
    assert first.meta["window"] == second.meta["window"] == "voi"


def test_burned_in_annotation_is_rejected_by_default_only() -> None:
    data = _roundtrip(_synthetic_dicom(PIXELS, BurnedInAnnotation="YES"))
    with pytest.raises(
        RejectedInput, match=r"^BurnedInAnnotation YES: pixels may carry burned-in patient text"
    ):
        decode_bytes(data, "burned.dcm", CFG)
    (img,) = decode_bytes(data, "burned.dcm", IngestConfig(reject_burned_in=False))
    assert img.pixels.shape == (2, 4)


def test_huge_declared_dicom_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _synthetic_dicom(PIXELS)
    ds.Rows, ds.Columns = 60000, 60000
    data = _roundtrip(ds)
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(RejectedInput, match=r"60000×60000.*over max_pixels=64000000"):
        decode_bytes(data, "huge.dcm", CFG)


def test_non_scan_modality_without_known_sop_class_is_rejected() -> None:
    ds = _synthetic_dicom(PIXELS, Modality="RTDOSE")
    ds.SOPClassUID = "1.2.3.4.5"  # private SOP class: the Modality decides
    with pytest.raises(RejectedInput, match=r"policy: Modality RTDOSE .* dose grid"):
        decode_bytes(_roundtrip(ds), "dose.dcm", CFG)


def test_deflate_bomb_is_rejected_before_pydicom_inflates_it() -> None:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(bytes(80 * 2**20)) + deflater.flush()  # 80 MiB of zeros in ~80 KiB
    data = b"\0" * 128 + b"DICM" + fp.getvalue() + body
    with pytest.raises(RejectedInput, match="decompression-bomb guard"):
        decode_bytes(data, "bomb.dcm", IngestConfig(max_pixels=1000))


def test_meta_is_allow_listed_and_patient_id_is_returned_apart() -> None:
    ds = _synthetic_dicom(
        PIXELS,
        PatientName="Doe^Jane",
        PatientID="PID-0042",
        PatientBirthDate="19700101",
        InstitutionName="St Elsewhere Hospital",
        ReferringPhysicianName="House^Gregory",
        StudyDate="20240101",
        AccessionNumber="ACC999",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.1111",
        WindowCenter=1000,
        WindowWidth=1000,
        ViewPosition="PA",
        PixelSpacing=[0.5, 0.25],
    )
    ds.add_new(0x00091010, "LO", "private vendor note")
    (img,) = decode_bytes(_roundtrip(ds), "phi.dcm", CFG)
    assert img.patient_ref == "PID-0042"
    assert set(img.meta) == META_KEYS
    text = json.dumps(img.meta)
    for secret in ("Doe", "PID-0042", "1970", "Elsewhere", "House", "2024", "ACC999", "1.2.826", "vendor"):
        assert secret not in text
    assert img.meta["view_position"] == "PA" and img.meta["pixel_spacing"] == [0.5, 0.25]


def test_png_meta_has_exactly_the_allow_listed_keys(tmp_path: Path) -> None:
    out = _decode_png(tmp_path, Image.new("L", (3, 2), 9))
    assert set(out.meta) == META_KEYS
    assert out.meta["modality"] is None and out.meta["pixel_spacing"] is None


# ====================================================================== privacy review (issue 11)


def test_free_text_attributes_keep_only_defined_terms() -> None:
    # Written by hand at a PACS: a body part naming the patient, a view that is no defined term, a
    # private SOP class UID whose root names the vendor.
    ds = _synthetic_dicom(PIXELS, BodyPartExamined="ZZQ800BODY DOE", ViewPosition="LATERAL", Modality="CT")
    ds.SOPClassUID = "1.2.826.0.1.3680043.9.9999.1"
    (img,) = decode_bytes(_roundtrip(ds), "free.dcm", CFG)
    assert img.meta["body_part"] is None and img.meta["view_position"] is None
    assert img.meta["sop_class"] is None and "1.2.826" not in json.dumps(img.meta)
    # Case and padding are forgiven for real defined terms.
    ds = _synthetic_dicom(PIXELS, BodyPartExamined="chest ", ViewPosition="pa", Modality="ZZQ")
    (img,) = decode_bytes(_roundtrip(ds), "terms.dcm", CFG)
    assert (img.meta["body_part"], img.meta["view_position"], img.meta["modality"]) == ("CHEST", "PA", None)


def test_meta_keys_are_the_deid_allow_list() -> None:
    from medvae.data.deid import ALLOWED_META

    assert frozenset(ALLOWED_META) == META_KEYS


def _reason(data: bytes, name: str, cfg: IngestConfig = CFG) -> str:
    with pytest.raises(RejectedInput) as exc:
        decode_bytes(data, name, cfg)
    return exc.value.reason


def test_rejection_reasons_never_quote_file_content() -> None:
    marker = "ZZQ802"
    reasons = [
        # An attribute value that is not a defined term.
        _reason(
            _roundtrip(_synthetic_dicom(PIXELS, PhotometricInterpretation=f"{marker} DOE JOHN")), "a.dcm"
        ),
        # The bytes of a file that is no image (a password file through a symlink).
        _reason(f"root:x:0:0:{marker}:/root:/bin/bash\n".encode() * 4, "passwd"),
        _reason(f"{marker} not dicom at all ".encode() * 20, "notes.dcm"),
        # A decoder that chokes: pydicom's message would name the element and its value.
        _reason(_roundtrip(_synthetic_dicom(PIXELS, Modality=marker))[:-3], "cut.dcm"),
    ]
    hex_marker = marker.encode().hex(" ")[:8]
    for reason in reasons:
        assert marker not in reason and "root" not in reason and hex_marker not in reason, reason
        assert "DOE" not in reason and "72 6f 6f 74" not in reason
    assert "PhotometricInterpretation (not a defined term)" in reasons[0]
    assert reasons[1].startswith("not a DICOM, PNG or JPEG file")


def test_unknown_vr_is_not_spelled_out() -> None:
    ds = _synthetic_dicom(PIXELS)
    data = bytearray(_roundtrip(ds))
    # Rewrite the VR of Rows (0028,0010), "US", as two letters of a name.
    at = data.index(b"\x28\x00\x10\x00US")
    data[at + 4 : at + 6] = b"QZ"
    reason = _reason(bytes(data), "vr.dcm")
    assert "QZ" not in reason


def test_secondary_capture_and_ultrasound_need_burned_in_annotation_no() -> None:
    sc = _synthetic_dicom(PIXELS, Modality="OT")
    sc.SOPClassUID = SecondaryCaptureImageStorage
    assert "burned-in text risk: Secondary Capture Image Storage" in _reason(
        _roundtrip(sc), "sc.dcm", DEFAULT
    )
    us = _synthetic_dicom(PIXELS, Modality="US", BurnedInAnnotation="UNKNOWN")
    assert "burned-in text risk: Modality US" in _reason(_roundtrip(us), "us.dcm", DEFAULT)
    # Declared free of burned-in text: ingested; the policy can be narrowed or turned off.
    sc.BurnedInAnnotation = "NO"
    (img,) = decode_bytes(_roundtrip(sc), "sc.dcm", DEFAULT)
    assert img.meta["sop_class"] == "Secondary Capture Image Storage"
    (img,) = decode_bytes(_roundtrip(us), "us.dcm", IngestConfig(burned_in_unless_declared=("SC",)))
    assert img.meta["modality"] == "US"
    ct = _synthetic_dicom(PIXELS)  # a CT needs no declaration
    assert decode_bytes(_roundtrip(ct), "ct.dcm", DEFAULT)[0].meta["modality"] == "CT"
    # YES is refused whatever the kind.
    ct.BurnedInAnnotation = "YES"
    assert _reason(_roundtrip(ct), "ct.dcm", DEFAULT).startswith("BurnedInAnnotation YES")


def test_identifying_values_are_exposed_for_label_vetting_only() -> None:
    ds = _synthetic_dicom(
        PIXELS,
        PatientName="Doe^John Paul^^Dr",
        PatientID="PID-0042",
        AccessionNumber="ACC999",
        StudyDate="20240131",
        PatientBirthDate="19121201",
        AcquisitionDateTime="20240131101500",
    )
    (img,) = decode_bytes(_roundtrip(ds), "ids.dcm", CFG)
    ident = img.identifiers
    assert ident is not None
    assert {"doe", "john", "paul", "dr"} <= ident.names
    assert {"pid0042", "acc999"} <= ident.ids
    assert {"20240131", "19121201"} <= ident.dates
    # Never in the metadata that is stored.
    assert not any(v in json.dumps(img.meta).lower() for v in ("doe", "pid", "acc999", "1912"))
    assert _decode_png_bytes(Image.new("L", (8, 8), 3)).identifiers is None


def _decode_png_bytes(img: Image.Image, cfg: IngestConfig = CFG) -> DecodedImage:
    (out,) = decode_bytes(_png(img), "scan.png", cfg)
    return out


def _with_text(text: str = "DOE^JOHN DOB 1912-12-01") -> Image.Image:
    """A smooth 256×256 'radiograph' with a line of white text at the top, 14 px tall (3.5 stored px)."""
    from PIL import ImageDraw, ImageFont

    yy, xx = np.mgrid[0:256, 0:256]
    img = Image.fromarray((60 + 80 * np.exp(-((xx - 128) ** 2 + (yy - 140) ** 2) / 6000.0)).astype(np.uint8))
    font = ImageFont.load_default(size=18)
    ImageDraw.Draw(img).text((6, 4), text, fill=255, font=font)
    return img


def test_burned_in_text_is_rejected_noted_or_ignored_as_configured() -> None:
    reason = _reason(_png(_with_text()), "text.png")
    assert reason.startswith("burned-in text suspected (a line of") and "top band" in reason
    assert "DOE" not in reason and "1912" not in reason
    kept = _decode_png_bytes(_with_text(), CFG.model_copy(update={"burned_in_text": "ingest"}))
    assert kept.notes and kept.notes[0].startswith("burned-in text suspected")
    assert not _decode_png_bytes(_with_text(), CFG.model_copy(update={"burned_in_text": "off"})).notes
    # The same image without the text passes.
    assert not _decode_png_bytes(_with_text(text="")).notes
