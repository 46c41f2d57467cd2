"""Synthetic Secondary Capture DICOM: valid IODs, no patient, written all or nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medvae.synth.dicom import MANIFEST, stage_synthetic_dicom, write_synthetic_dicom
from tests.synth.helpers import noise_images

# dciodvfy (David Clunie's IOD validator) comes with Debian/Ubuntu's dicom3tools package: CI installs it
# with `apt-get install -y --no-install-recommends dicom3tools` and sets MEDVAE_REQUIRE_DCIODVFY=1, so that
# a missing validator fails there instead of skipping. MEDVAE_DCIODVFY may name a binary off PATH.
_DCIODVFY = os.environ.get("MEDVAE_DCIODVFY") or shutil.which("dciodvfy")
# The warnings dciodvfy may give, and why they are accepted: a synthetic image has no patient, no
# acquisition date and no study ID (all type 2, present and empty), which a DICOMDIR would want; and
# Laterality (type 2C) is empty because the model does not know the body part.
_ACCEPTED_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR",
    "is only permitted to be empty when actually unknown",
)


@pytest.fixture
def dciodvfy() -> str:
    if _DCIODVFY and os.access(_DCIODVFY, os.X_OK):
        return _DCIODVFY
    why = "dciodvfy not found (apt-get install dicom3tools, or MEDVAE_DCIODVFY=/path/to/dciodvfy)"
    if os.environ.get("MEDVAE_REQUIRE_DCIODVFY") == "1":
        pytest.fail(f"MEDVAE_REQUIRE_DCIODVFY=1 but {why}")
    pytest.skip(why)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.parts[-3:]))


def test_synthetic_dicom_round_trips(tmp_path: Path) -> None:
    imgs = noise_images(3, seed=5)
    ids = ["syn-aaa", "syn-bbb", "syn-ccc"]
    out = tmp_path / "dcm"
    paths = write_synthetic_dicom(
        imgs, out, ids=ids, labels=["NORMAL", None, "PNEUMONIA"], model_hash="abc123", seed=9
    )
    assert [p.name for p in paths] == [f"{i}.dcm" for i in ids]
    assert len({p.parent for p in paths}) == 1 and paths[0].parent.parent == out
    sops, studies, series = set(), set(), set()
    for img, p in zip(imgs, paths, strict=True):
        assert p.read_bytes()[128:132] == b"DICM"  # preamble + file meta
        ds = pydicom.dcmread(p)
        np.testing.assert_array_equal(ds.pixel_array, img)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
        assert ds.ConversionType == "SYN" and ds.Modality == "OT" and ds.Manufacturer == "medvae"
        # No patient exists: the type 2 patient attributes are present and empty.
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            assert tag in ds and str(ds.data_element(tag).value or "") == ""
        for tag in ("PatientAge", "InstitutionName", "OtherPatientIDs"):
            assert tag not in ds
        assert "abc123" in ds.ImageComments and f"id={p.stem}" in ds.ImageComments
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert UID(uid).is_valid
        sops.add(ds.SOPInstanceUID)
        studies.add(ds.StudyInstanceUID)
        series.add(ds.SeriesInstanceUID)
    assert len(sops) == 3 and len(studies) == 1 and len(series) == 1
    first = pydicom.dcmread(paths[0])
    assert "label=NORMAL" in first.ImageComments and "NORMAL" not in str(first.SeriesDescription)
    assert (paths[0].parent / MANIFEST).is_file()
    again = write_synthetic_dicom(imgs[:1], tmp_path / "dcm2", ids=["x"], labels=None, model_hash="h", seed=9)
    assert pydicom.dcmread(again[0]).StudyInstanceUID not in studies


@pytest.mark.parametrize(
    ("ids", "labels"),
    [(["a", "b"], None), (["a", "b", "c"], ["x"]), (["a", "a", "b"], None), (["a", "/", "b"], None)],
)
def test_synthetic_dicom_rejects_bad_inputs(tmp_path: Path, ids: list[str], labels: list[str] | None) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dicom(noise_images(3), tmp_path / "x", ids=ids, labels=labels, model_hash="h", seed=0)
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_synthetic_dicom_passes_dciodvfy(tmp_path: Path, dciodvfy: str) -> None:
    paths = write_synthetic_dicom(
        noise_images(2),
        tmp_path / "d",
        ids=["syn-1", "syn-2"],
        labels=["NORMAL", "Ünïcode"],
        model_hash="ab",
        seed=1,
    )
    for p in paths:
        res = subprocess.run([dciodvfy, str(p)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        assert res.returncode == 0 and "SCImage" in report, report  # it recognised the IOD it checked
        lines = [line for line in report.splitlines() if line.strip() and line.strip() != "SCImage"]
        assert not [line for line in lines if line.startswith("Error")], report
        unexpected = [line for line in lines if not any(w in line for w in _ACCEPTED_WARNINGS)]
        assert unexpected == [], report


def test_stage_publishes_only_on_request(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staged = stage_synthetic_dicom(
        noise_images(4), out, ids=list("abcd"), labels=None, model_hash="m", seed=0
    )
    assert not out.exists() or _visible(out) == []  # nothing visible before publish
    paths = staged.publish()
    assert [p.name for p in paths] == ["a.dcm", "b.dcm", "c.dcm", "d.dcm"] and all(p.is_file() for p in paths)
    assert not staged.staging.exists()
    with pytest.raises(RuntimeError):
        staged.publish()
    # A repeated run (same ids, model and seed: the same batch name) publishes nothing new and keeps
    # the batch already there.
    again = stage_synthetic_dicom(
        noise_images(4, seed=1), out, ids=list("abcd"), labels=None, model_hash="m", seed=0
    )
    assert again.batch == staged.batch
    assert again.publish() == paths and not again.staging.exists()
    np.testing.assert_array_equal(pydicom.dcmread(paths[0]).pixel_array, noise_images(4)[0])
    # The same batch name for other ids: refused, nothing overwritten, and the caller can discard.
    dup = stage_synthetic_dicom(
        noise_images(3), out, ids=list("abc"), labels=None, model_hash="m", seed=0, batch=staged.batch
    )
    with pytest.raises(FileExistsError, match="other row ids"):
        dup.publish()
    assert dup.staging.is_dir()
    np.testing.assert_array_equal(pydicom.dcmread(paths[3]).pixel_array, noise_images(4)[3])
    dup.discard()
    assert not dup.staging.exists()
    dropped = stage_synthetic_dicom(noise_images(2), out, ids=["p", "q"], labels=None, model_hash="m", seed=5)
    dropped.discard()
    assert sorted(p.name for p in out.iterdir()) == [paths[0].parent.name]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exception_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medvae.synth.dicom as mod

    real = mod.atomic_write_bytes
    calls = {"n": 0}

    def failing(path: Path, data: bytes, *, mode: int | None = None) -> Path:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        return real(path, data, mode=mode)

    monkeypatch.setattr(mod, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="injected"):
        write_synthetic_dicom(
            noise_images(10),
            tmp_path / "out",
            ids=[f"r{i}" for i in range(10)],
            labels=None,
            model_hash="m",
            seed=0,
        )
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import numpy as np, sys
        from pathlib import Path
        from medvae.synth.dicom import write_synthetic_dicom
        imgs = np.random.default_rng(0).integers(0, 256, size=(100000, 16, 16), dtype=np.uint8)
        write_synthetic_dicom(imgs, Path({str(out)!r}), ids=[f"r{{i}}" for i in range(len(imgs))],
                              labels=None, model_hash="m", seed=0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        # Wait until the writer is demonstrably in the middle: some staged files exist.
        while time.monotonic() < deadline:
            staged = list(tmp_path.glob(".out.staging-*/*.dcm"))
            if len(staged) >= 20:
                break
            assert proc.poll() is None, "the writer ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the writer never started writing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() or list(out.iterdir()) == []  # no batch, no partial files visible
    leftovers = list(tmp_path.glob(".out.staging-*"))
    assert leftovers, "the staged files should have been hidden, not written into out/"
    # The next run beside the same folder sweeps the dead writer's staging folder and publishes whole.
    paths = write_synthetic_dicom(
        noise_images(3), out, ids=["a", "b", "c"], labels=None, model_hash="m", seed=1
    )
    assert all(p.is_file() for p in paths) and not list(tmp_path.glob(".out.staging-*"))
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["a.dcm", "b.dcm", "c.dcm", MANIFEST]
