"""Label vetting (medvae.data.labels): DICOM folder labels, identifying labels, per-patient labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvae.config import IngestConfig
from medvae.data.labels import (
    LABEL_NOTE,
    Identifiers,
    count_notes,
    identifying_reason,
    labels_per_patient_warning,
    vet_label,
)
from medvae.data.readers import DecodedImage

IDENT = Identifiers(
    names=frozenset({"doe", "john", "al"}),
    ids=frozenset({"zzq100", "acc4711"}),
    dates=frozenset({"19121201", "20240131"}),
)


def _image(fmt: str, ident: Identifiers | None = IDENT) -> DecodedImage:
    meta = {"source_format": fmt}
    return DecodedImage(np.zeros((4, 4), np.float32), meta, None, 0, 1, identifiers=ident)


@pytest.mark.parametrize(
    ("label", "why"),
    [
        ("DOE_JOHN_ZZQ100", "PatientName"),
        ("series_pa_doe", "PatientName"),
        ("JohnDoe", "PatientName"),  # a component inside a longer word
        ("study-ACC4711", "PatientID or AccessionNumber"),
        ("scan 1912-12-01", "a date in the file"),
        ("01.12.1912", "a date in the file"),
        ("1.2.840.113619.2.55.3.604688119", "UID"),
        ("20240131_1532", "a date in the file"),
        ("00012345", "mostly digits"),
        ("MRN0042", "an ID"),
        ("ZZQ200PA", "letters and digits"),
        ("ab12345", "an ID"),
    ],
)
def test_identifying_labels_are_refused(label: str, why: str) -> None:
    reason = identifying_reason(label, IDENT)
    assert reason is not None and why in reason
    assert label.lower() not in reason.lower()


@pytest.mark.parametrize(
    "label", ["normal", "pneumonia", "covid19", "grade3", "0", "1", "T2w", "cardiomegaly"]
)
def test_class_labels_pass(label: str) -> None:
    assert identifying_reason(label, IDENT) is None
    assert identifying_reason(label, None) is None


def test_short_name_components_match_whole_tokens_only() -> None:
    # "AL" is a name component: it must refuse "al_series" but not "normal".
    assert identifying_reason("al_series", IDENT) is not None
    assert identifying_reason("normal", IDENT) is None


def test_dicom_folder_labels_are_withheld_by_default_png_ones_kept() -> None:
    cfg = IngestConfig()
    label, note = vet_label("pneumonia", [_image("dicom")], cfg)
    assert label is None and note is not None and note.startswith(LABEL_NOTE)
    assert vet_label("pneumonia", [_image("png", None)], cfg) == ("pneumonia", None)
    opted_in = IngestConfig(dicom_folder_labels=True)
    assert vet_label("pneumonia", [_image("dicom")], opted_in) == ("pneumonia", None)
    # Opting in does not let a patient's name through.
    label, note = vet_label("DOE_JOHN", [_image("dicom")], opted_in)
    assert label is None and "PatientName" in (note or "") and "DOE" not in (note or "")


def test_csv_labels_are_vetted_but_not_withheld_for_being_dicom(tmp_path: Path) -> None:
    cfg = IngestConfig(labels_csv=tmp_path / "labels.csv")
    assert vet_label("pneumonia", [_image("dicom")], cfg) == ("pneumonia", None)
    assert vet_label("DOE_JOHN", [_image("dicom")], cfg)[0] is None
    # vet_labels: false keeps what the operator gave.
    keep = IngestConfig(labels_csv=tmp_path / "labels.csv", vet_labels=False)
    assert vet_label("DOE_JOHN", [_image("dicom")], keep) == ("DOE_JOHN", None)


def test_notes_are_counted_by_reason() -> None:
    notes = [
        vet_label("DOE", [_image("dicom")], IngestConfig(dicom_folder_labels=True))[1],
        vet_label("x", [_image("dicom")], IngestConfig())[1],
        vet_label("y", [_image("dicom")], IngestConfig())[1],
        None,
        "burned-in text suspected (...)",
    ]
    counts = count_notes(notes)
    assert counts == {
        "it matches the file's PatientName": 1,
        "folder names of DICOM files are not taken as labels": 2,
    }


def test_labels_per_patient_warning() -> None:
    # A PACS tree: one folder (label) per patient.
    pacs = labels_per_patient_warning([f"PATIENT_{i}" for i in range(58)], [f"p{i}" for i in range(58)])
    assert pacs is not None and "58 distinct labels for 58 patients" in pacs and "PATIENT_" not in pacs
    # ImageFolder classes: two labels shared by many patients.
    labels = ["normal", "pneumonia"] * 500
    assert labels_per_patient_warning(labels, [f"p{i % 400}" for i in range(1000)]) is None
    # Few labels never warn, and rows without a patient key are left out.
    assert labels_per_patient_warning(["a", "b", "c"], ["p1", "p2", "p3"]) is None
    assert labels_per_patient_warning([f"L{i}" for i in range(20)], [None] * 20) is None


def test_ingest_warns_when_folder_labels_are_one_per_patient(tmp_path: Path) -> None:
    """The CLI says so (without a label value) when each folder holds one patient; class folders do not."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from medvae.cli import app

    rng = np.random.default_rng(0)

    def tree(root: Path, folder_of: dict[int, str]) -> None:
        for i, folder in folder_of.items():
            p = root / folder / f"IM-{i:04d}-0001.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(p)

    tree(tmp_path / "pacs", {i: f"SMITH_ANNA_{i:03d}" for i in range(12)})
    tree(tmp_path / "classes", {i: ("normal", "pneumonia")[i % 2] for i in range(12)})
    runner = CliRunner()
    for name, expect in (("pacs", True), ("classes", False)):
        report = tmp_path / f"{name}.json"
        args = ["ingest", str(tmp_path / name), "--store", str(tmp_path / f"s_{name}"), "--workers", "1"]
        res = runner.invoke(app, [*args, "--set", "burned_in_text=off", "--report", str(report)])
        assert res.exit_code == 0, res.output
        assert ("labels look like one per patient" in res.output) is expect, res.output
        assert "SMITH" not in res.output
        assert bool(json.loads(report.read_text())["warnings"]) is expect
