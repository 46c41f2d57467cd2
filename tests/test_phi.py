"""PHI test: DICOMs with distinctive PHI in every PS3.15 Annex E Basic Profile attribute, in private tags and
in folder and file names, go through ``medvae ingest`` and ``medvae export``; not one planted string may occur
in any byte under the store or the export, nor in ``medvae versions --json``.

A PNG and a JPEG in a PHI-named folder, with PHI in their names and text metadata, are ingested too, labelled
from a CSV: a clean CSV label must replace the PHI folder name that folder labels would have used.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from medvae.cli import app
from tests.phi import (
    ANNEX_E_BASIC_PROFILE,
    Leak,
    PhiScanner,
    make_phi_dicoms_with_origins,
    make_phi_images,
    scan_for_phi,
)

N_DICOM = 3
IMAGE_LABELS = ("normal", "pneumonia")  # clean labels for the PNG and the JPEG, from the CSV


@dataclass
class PhiRun:
    planted: dict[str, str]  # planted string -> where it was planted
    dicom_src: Path
    image_src: Path
    images: list[Path]
    store: Path
    export: Path
    reports: list[Path]
    versions_out: str
    exit_codes: dict[str, int]
    outputs: dict[str, str]


def _invoke(runner: CliRunner, args: list[str], stdout_only: bool = False) -> tuple[int, str]:
    """Run the CLI in-process; return the exit code and its output (with any uncaught exception)."""
    result = runner.invoke(app, args)
    text = result.stdout if stdout_only else result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, text


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory: pytest.TempPathFactory) -> PhiRun:
    base = tmp_path_factory.mktemp("phi")
    dicom_src = base / "dicom_src"
    image_src = base / "image_src"
    planted = make_phi_dicoms_with_origins(dicom_src, N_DICOM)
    images, image_planted = make_phi_images(image_src)
    planted.update(image_planted)

    # The labels CSV lives in a clean folder; its rows name the PHI paths (it is operator input, not output).
    labels_dir = base / "labels"
    labels_dir.mkdir()
    labels_csv = labels_dir / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for img, label in zip(images, IMAGE_LABELS, strict=True):
            w.writerow([os.path.relpath(img, labels_dir), label])

    store, export = base / "store", base / "export"
    reports = [base / "reports" / "dicom.json", base / "reports" / "images.json"]
    runner = CliRunner()
    codes: dict[str, int] = {}
    outputs: dict[str, str] = {}
    # Folder labels would be the PHI folder names, so the DICOMs go in without labels ...
    codes["ingest dicom"], outputs["ingest dicom"] = _invoke(
        runner, ["ingest", str(dicom_src), "--store", str(store), "--no-labels", "--report", str(reports[0])]
    )
    # ... and the images with clean labels from the CSV.
    codes["ingest images"], outputs["ingest images"] = _invoke(
        runner,
        [
            "ingest",
            str(image_src),
            "--store",
            str(store),
            "--labels-csv",
            str(labels_csv),
            "--report",
            str(reports[1]),
        ],
    )
    codes["export"], outputs["export"] = _invoke(
        runner, ["export", "--store", str(store), "--out", str(export)]
    )
    codes["versions"], outputs["versions"] = _invoke(
        runner, ["versions", "--store", str(store), "--json"], stdout_only=True
    )
    return PhiRun(
        planted, dicom_src, image_src, images, store, export, reports, outputs["versions"], codes, outputs
    )


def _format_leaks(leaks: list[Leak], planted: dict[str, str], limit: int = 40) -> str:
    lines = [f"{len(leaks)} PHI leak(s), {len({lk.needle for lk in leaks})} distinct planted strings:"]
    lines += [f"  {lk}  <- planted in {planted.get(lk.needle, '?')}" for lk in leaks[:limit]]
    if len(leaks) > limit:
        lines.append(f"  ... and {len(leaks) - limit} more")
    return "\n".join(lines)


def test_generator_covers_annex_e(tmp_path: Path) -> None:
    assert len(ANNEX_E_BASIC_PROFILE) == 459
    assert len({a.tag for a in ANNEX_E_BASIC_PROFILE}) == 459
    planted = make_phi_dicoms_with_origins(tmp_path, 1)
    origins = "\n".join(planted.values())
    # Every attribute except the two DIMSE command-set ones (not allowed in files) holds a planted value,
    # or (for AS, US, FL ... values too short to search for) at least is set.
    ds = pydicom.dcmread(next(tmp_path.rglob("*.dcm")))
    for a in ANNEX_E_BASIC_PROFILE:
        if a.group == 0x0000:
            continue
        present = a.tag in ds or (a.group == 0x0002 and a.tag in ds.file_meta)
        assert present, f"{a.keyword} not written"
    assert "(0010,0010) PatientName" in origins and "private" in origins and "path component" in origins
    assert all(len(s) >= 8 for s in planted)


def test_ingest_export_versions_succeed(phi_run: PhiRun) -> None:
    for step, code in phi_run.exit_codes.items():
        assert code == 0, f"{step} failed ({code}):\n{phi_run.outputs[step]}"
    dicom_report = json.loads(phi_run.reports[0].read_text())
    image_report = json.loads(phi_run.reports[1].read_text())
    assert dicom_report["counts"] == {"seen": N_DICOM, "ingested": N_DICOM, "rejected": 0, "skipped": 0}
    assert image_report["counts"] == {"seen": 2, "ingested": 2, "rejected": 0, "skipped": 0}
    history = json.loads(phi_run.versions_out)
    assert [h["rows"] for h in history] == [N_DICOM, N_DICOM + 2]


def test_csv_labels_replace_phi_folder_names(phi_run: PhiRun) -> None:
    assert phi_run.exit_codes["export"] == 0, phi_run.outputs["export"]
    with (phi_run.export / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        labels = Counter(row["label"] for row in csv.DictReader(fh))
    assert labels == Counter({"": N_DICOM, **dict.fromkeys(IMAGE_LABELS, 1)})
    folders = {p.name for p in phi_run.export.iterdir() if p.is_dir()}
    assert folders == {"unlabelled", *IMAGE_LABELS}


def test_no_planted_phi_in_store_or_export(phi_run: PhiRun) -> None:
    assert phi_run.exit_codes["ingest dicom"] == 0, phi_run.outputs["ingest dicom"]
    assert phi_run.exit_codes["export"] == 0, phi_run.outputs["export"]
    files = [p for root in (phi_run.store, phi_run.export) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.suffix == ".png" for p in files)
    assert any(p.parent.name == "_delta_log" for p in files) and any(p.name == "manifest.csv" for p in files)
    leaks = scan_for_phi({"store": phi_run.store, "export": phi_run.export}, phi_run.planted)
    assert not leaks, _format_leaks(leaks, phi_run.planted)


def test_no_planted_phi_in_versions_output(phi_run: PhiRun) -> None:
    assert phi_run.exit_codes["versions"] == 0, phi_run.outputs["versions"]
    leaks = PhiScanner(phi_run.planted).scan_text(phi_run.versions_out, "versions --json", "stdout")
    assert not leaks, _format_leaks(leaks, phi_run.planted)


def test_scanner_finds_a_planted_string(phi_run: PhiRun, tmp_path: Path) -> None:
    """The scan can fail: PHI dropped into a copy of the real store, in each form it looks for, is found."""
    assert phi_run.store.is_dir(), phi_run.outputs["ingest dicom"]
    planted = list(phi_run.planted)
    copy = tmp_path / "store"
    shutil.copytree(phi_run.store, copy)
    scanner = PhiScanner(planted)
    # Real leaks, if any, are the other tests' business; this one looks only at what it adds.
    before = {lk.needle for lk in scanner.scan_tree(copy)}

    raw, utf16, in_parquet, in_png, in_name, in_json = planted[1:7]
    (copy / "dummy.bin").write_bytes(b"\x00junk" + raw.lower().encode() + b"junk")
    (copy / "notes.txt").write_bytes(utf16.encode("utf-16-le"))
    table = pa.table({"text": [in_parquet * 50], "n": [1]})  # repeated: compression hides it from raw bytes
    pq.write_table(table, copy / "part-x.parquet", compression="zstd")
    info = PngInfo()
    info.add_text("c", in_png * 50, zip=True)
    Image.new("L", (4, 4)).save(copy / "x.png", pnginfo=info)
    (copy / f"label_{in_name}").mkdir()
    (copy / "_delta_log" / "99.json").write_text(json.dumps({"meta": json.dumps({"k": in_json})}) + "\n")

    leaks = scanner.scan_tree(copy)
    assert {lk.needle for lk in leaks} - before == {raw, utf16, in_parquet, in_png, in_name, in_json} - before
    hows = {(lk.needle, lk.how.split(",")[0]) for lk in leaks}
    assert (in_parquet, "parquet cells of column 'text'") in hows  # found after decompression
    assert (in_png, "decoded image metadata") in hows  # found inside a compressed zTXt chunk
    assert (utf16, "raw bytes") in hows and (in_name, "path name") in hows
    # A path-sanitised form of a PHI folder name is caught too.
    assert scanner.scan_text("PHI_DOE_JOHN_MRN12345670", "x")


def test_scan_catches_a_real_pipeline_leak(phi_run: PhiRun, tmp_path: Path) -> None:
    """End to end, the scan can fail: with folder labels (the default) the PHI folder names become labels."""
    store = tmp_path / "store"
    code, out = _invoke(CliRunner(), ["ingest", str(phi_run.dicom_src), "--store", str(store)])
    assert code == 0, out
    leaked = {lk.needle for lk in scan_for_phi({"store": store}, phi_run.planted)}
    study_folders = {p.name for p in phi_run.dicom_src.glob("*/*") if p.is_dir()}
    assert study_folders and study_folders <= leaked


def test_labels_csv_in_a_phi_folder_does_not_leak_its_path(phi_run: PhiRun, tmp_path: Path) -> None:
    csv_dir = tmp_path / "csv_home" / phi_run.images[0].parent.name  # the PHI folder name, planted already
    csv_dir.mkdir(parents=True)
    labels_csv = csv_dir / "labels.csv"
    rows = "".join(f"{p},{label}\n" for p, label in zip(phi_run.images, IMAGE_LABELS, strict=True))
    labels_csv.write_text("path,label\n" + rows, encoding="utf-8")
    store = tmp_path / "store"
    args = ["ingest", str(phi_run.image_src), "--store", str(store), "--labels-csv", str(labels_csv)]
    code, out = _invoke(CliRunner(), args)
    assert code == 0, out
    leaks = scan_for_phi({"store": store}, phi_run.planted)
    assert not leaks, _format_leaks(leaks, phi_run.planted)
