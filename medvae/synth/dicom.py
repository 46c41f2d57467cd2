"""Synthetic images as Secondary Capture DICOM files, published all or nothing.

Files are first written into a hidden staging folder beside the destination and then published with
one ``rename`` of that folder into ``out_dir/<batch>``. A crash (or SIGKILL) at any point leaves either
no batch folder at all or the whole batch with its manifest: never part of one, and never files of two
runs mixed in one folder. The caller stages, commits its store rows, and only then publishes, so no
published DICOM lacks its store row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medvae._io import atomic_write_bytes, atomic_write_json, fsync_dir, safe_name

MANIFEST = "manifest.json"
_STAGING_TAG = ".staging-"


# Type 2 attributes written present and empty: no patient exists, and nothing about the study is
# known. Patient (PS3.3 C.7.1.1): name, ID, birth date, sex. General Study (C.7.2.1): date, time,
# referring physician, study ID, accession number. General Series (C.7.3.1): Laterality is type 2C and
# dciodvfy asks for it when no body part says the part is unpaired.
_EMPTY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Laterality",
)


def _patient_study_series(ds: Dataset, study_uid: str, series_uid: str) -> None:
    for keyword in _EMPTY_TYPE2:
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medvae synthetic: no source patient"
    ds.StudyInstanceUID = study_uid
    # General Series: Modality and the UID type 1, SeriesNumber type 2.
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "medvae synthetic"
    # General Equipment (C.7.5.1): Manufacturer type 2. SC Equipment (C.8.6.1): ConversionType type 1.
    ds.Manufacturer = "medvae"
    ds.ConversionType = "SYN"
    ds.SecondaryCaptureDeviceManufacturer = "medvae"


def _dataset(
    image: np.ndarray,
    *,
    index: int,
    row_id: str,
    label: str | None,
    model_hash: str,
    seed: int,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: labels come from folder names and may be non-ASCII
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    _patient_study_series(ds, study_uid, series_uid)
    # General Image (C.7.6.1) and SC Image: the label appears only here, as the model's label text.
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = index + 1
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = (
        f"medvae synthetic image; label={label or ''}; model={model_hash}; seed={seed}; id={row_id}"
    )
    # Image Pixel module: 8-bit unsigned greyscale, 0 = black.
    rows, cols = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    data = np.ascontiguousarray(image).tobytes()
    ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")  # DICOM values have even length
    return ds


@dataclass(eq=False)
class StagedDicom:
    """A complete, hidden batch of synthetic DICOMs waiting to be published (or discarded).

    Attributes:
        staging: the hidden folder beside ``out_dir`` holding every file and the manifest.
        out_dir: where :meth:`publish` puts the batch folder.
        batch: the batch folder's name (``out_dir / batch`` once published).
        names: the file names, in input order (``<row id>.dcm``).
    """

    staging: Path
    out_dir: Path
    batch: str
    names: list[str] = field(default_factory=list)
    _done: bool = False

    def publish(self) -> list[Path]:
        """Make the whole batch visible at once: rename the staging folder to ``out_dir / batch``.

        Publishing is idempotent: when ``out_dir / batch`` already holds a batch of the same row ids (a
        repeated augment with the same model, seed and labels), that batch is kept and the staged copy
        discarded.

        Returns:
            The published file paths, in input order.

        Raises:
            FileExistsError: when ``out_dir / batch`` already exists with other row ids (or without a
                manifest); nothing is overwritten and the staged batch is kept, so the caller can still
                discard it.
            RuntimeError: when the batch was already published or discarded.
        """
        if self._done:
            raise RuntimeError(f"batch {self.batch} was already published or discarded")
        dest = self.out_dir / self.batch
        if dest.exists():
            if _manifest_ids(dest) == _manifest_ids(self.staging):
                # A repeated run (same model, seed and row ids: the default batch name): the store
                # added nothing new, so neither does this. Keep the published batch, drop the copy.
                self.discard()
                return [dest / n for n in self.names]
            raise FileExistsError(
                f"{dest}: a batch of that name with other row ids exists already; not overwriting it"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        os.rename(self.staging, dest)  # one atomic rename within the same parent file system
        fsync_dir(self.out_dir)
        fsync_dir(self.staging.parent)
        self._done = True
        return [dest / n for n in self.names]

    def discard(self) -> None:
        """Delete the staged files (after a failed store commit); a no-op once published or discarded."""
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._done = True


def _manifest_ids(batch: Path) -> list[str] | None:
    # The row ids a batch folder's manifest lists, in order; None when it has no readable manifest.
    try:
        files = json.loads((batch / MANIFEST).read_text(encoding="utf-8"))["files"]
        return [str(f["id"]) for f in files]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _staging_dir(out_dir: Path) -> Path:
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out_dir)
    prefix = f".{out_dir.name}{_STAGING_TAG}{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _sweep_stale(out_dir: Path) -> None:
    # Staging folders of processes that died (killed mid-write) are hidden, but would pile up: remove
    # those whose writer process no longer exists. A live writer's folder is never touched.
    for p in out_dir.parent.glob(f".{out_dir.name}{_STAGING_TAG}*"):
        try:
            pid = int(p.name.split(_STAGING_TAG, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _check_inputs(images: np.ndarray, ids: Sequence[str], labels: Sequence[str | None] | None) -> list[str]:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images (n, H, W), got {images.dtype} {images.shape}")
    n = len(images)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} images")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    names = [safe_name(str(i), "") for i in ids]
    if any(not name for name in names):
        raise ValueError("every id must contain at least one of [A-Za-z0-9]; got an empty file name")
    if len(set(names)) != n:
        raise ValueError("ids must be distinct (after making them safe file names)")
    return [f"{name}.dcm" for name in names]


def batch_name(ids: Sequence[str], model_hash: str, seed: int) -> str:
    """The default batch folder name: model hash prefix, seed and a digest of the row ids (deterministic)."""
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:12]
    return safe_name(f"{model_hash[:12]}-seed{seed}-{digest}", "batch")


def stage_synthetic_dicom(
    images: np.ndarray,
    out_dir: Path,
    *,
    ids: Sequence[str],
    labels: Sequence[str | None] | None,
    model_hash: str,
    seed: int,
    batch: str | None = None,
) -> StagedDicom:
    """Write every image as a Secondary Capture DICOM into a hidden staging folder beside ``out_dir``.

    Nothing is visible in ``out_dir`` until :meth:`StagedDicom.publish`; commit the store rows first,
    then publish (or :meth:`StagedDicom.discard` when the commit fails). A crash before publishing leaves
    only the hidden staging folder, which the next call beside the same ``out_dir`` removes.

    Each file (``<row id>.dcm``) is a valid SC Image IOD: Explicit VR Little Endian, MONOCHROME2, 8 bits,
    preamble and file meta; Patient, General Study, General Series, General Equipment, SC Equipment,
    General Image, Image Pixel and SOP Common modules with every type 1 attribute filled and every type
    2 present. No patient exists: the patient attributes are present and empty, PatientIdentityRemoved
    YES, BurnedInAnnotation NO, ConversionType SYN; the label appears only in ImageComments. One call is
    one study and one series (fresh UIDs). ``manifest.json`` lists id, file, label and SOP Instance UID.

    Args:
        images: uint8 (n, H, W).
        out_dir: the folder that receives the batch folder on publish.
        ids: the store row id of each image (the file names; distinct).
        labels: the label each image was sampled for (a conditional model), or None.
        model_hash: the model that generated the images.
        seed: the sampling seed.
        batch: the batch folder name; default :func:`batch_name`.

    Returns:
        The staged batch.

    Raises:
        ValueError: for a non-uint8 or non-3-D array, or ids/labels of the wrong length, or repeated ids.
    """
    images = np.asarray(images)
    names = _check_inputs(images, ids, labels)
    out_dir = Path(out_dir)
    batch = safe_name(batch, "batch") if batch is not None else batch_name(ids, model_hash, seed)
    staging = _staging_dir(out_dir)
    try:
        study_uid, series_uid = generate_uid(), generate_uid()
        entries = []
        for i, name in enumerate(names):
            label = None if labels is None else labels[i]
            ds = _dataset(
                images[i],
                index=i,
                row_id=str(ids[i]),
                label=label,
                model_hash=model_hash,
                seed=seed,
                study_uid=study_uid,
                series_uid=series_uid,
            )
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            atomic_write_bytes(staging / name, buf.getvalue(), mode=0o644)
            entries.append(
                {"id": str(ids[i]), "file": name, "label": label, "sop_instance_uid": ds.SOPInstanceUID}
            )
        manifest = {
            "model_hash": model_hash,
            "seed": seed,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "files": entries,
        }
        atomic_write_json(staging / MANIFEST, manifest)  # last: a batch folder always has its manifest
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide the published batch from other users
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedDicom(staging=staging, out_dir=out_dir, batch=batch, names=names)


def write_synthetic_dicom(
    images: np.ndarray,
    out_dir: Path,
    *,
    ids: Sequence[str],
    labels: Sequence[str | None] | None,
    model_hash: str,
    seed: int,
) -> list[Path]:
    """:func:`stage_synthetic_dicom` then publish at once: ``out_dir/<batch>/<row id>.dcm``, all or nothing.

    Use the two steps instead when the files must appear only after a store commit succeeded.

    Returns:
        The published paths, in input order.
    """
    staged = stage_synthetic_dicom(images, out_dir, ids=ids, labels=labels, model_hash=model_hash, seed=seed)
    try:
        return staged.publish()
    except BaseException:
        staged.discard()
        raise
