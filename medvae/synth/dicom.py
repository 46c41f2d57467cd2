"""Synthetic images as Secondary Capture DICOM files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medvae._io import atomic_write_bytes


def write_synthetic_dicom(
    images: np.ndarray,
    out_dir: Path,
    *,
    labels: list[str | None] | None,
    model_hash: str,
    seed: int,
) -> list[Path]:
    """Write synthetic images as Secondary Capture DICOM files (``synthetic_00000.dcm``, ...).

    Each file is Explicit VR Little Endian, MONOCHROME2, 8 bits, with a preamble and file meta. One call
    is one study and one series (fresh UIDs); each image gets a fresh SOP Instance UID. No patient
    attribute carries a value: Patient Name and ID are present but empty (type 2) and nothing else about
    a patient is written (no birth date, sex, dates or institution), because no patient exists.
    PatientIdentityRemoved YES, ConversionType SYN and the comments say so to any viewer or PACS.

    Args:
        images: uint8 (n, H, W).
        out_dir: the folder (created if needed); existing files of the same names are replaced.
        labels: the label each image was sampled for (a conditional model), or None.
        model_hash: identifies the model that generated the images (written to ImageComments).
        seed: the sampling seed (written to ImageComments).

    Returns:
        The written paths.

    Raises:
        ValueError: for a non-uint8 or non-3-D array, or a label list of the wrong length.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images (n, H, W), got {images.dtype} {images.shape}")
    n, rows, cols = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths: list[Path] = []
    for i in range(n):
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
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.ImageType = ["DERIVED", "SECONDARY"]
        # Patient and study modules: type 2 attributes present and empty; nothing that could identify.
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "medvae synthetic: no source patient"
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.Modality = "OT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "medvae synthetic"
        ds.InstanceNumber = i + 1
        ds.PatientOrientation = ""
        ds.ConversionType = "SYN"
        ds.BurnedInAnnotation = "NO"
        label = None if labels is None else labels[i]
        ds.ImageComments = (
            f"medvae synthetic image; label={label or ''}; model={model_hash}; seed={seed}; index={i}"
        )
        # Image pixel module: 8-bit unsigned greyscale, 0 = black.
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        data = np.ascontiguousarray(images[i]).tobytes()
        ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")  # DICOM values have even length

        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        path = out_dir / f"synthetic_{i:05d}.dcm"
        atomic_write_bytes(path, buf.getvalue(), mode=0o644)
        paths.append(path)
    return paths
