"""Label vetting: which folder or CSV labels may be stored, and when labels look like one per patient.

A label is stored in the store's ``label`` column, and from there reaches the Delta log's statistics,
export folder names, manifest.csv, a model's ``meta.json`` and the synthetic rows and DICOMs made from
it. So a label is as public as the images, and it must not name a patient. With ImageFolder data the
folder names are classes (``normal/``, ``pneumonia/``); with a PACS export (``PATIENT_NAME_ID/STUDY/
SERIES/IMG.dcm``) the parent folder is a series or study named after the patient. Hence:

* **DICOM folder labels are off by default** (``dicom_folder_labels``): a DICOM file takes no folder
  label unless asked; PNG/JPEG files keep theirs. Labels from a labels CSV are the operator's choice and
  are only vetted.
* **Identifying labels are withheld** (``vet_labels``): a label that matches the file's own PatientName
  (any component, case-insensitive), PatientID, AccessionNumber or any date in the file, or that looks
  like a UID (dotted digits) or an ID (mostly digits, or a long run of letters and digits), is not stored.
  The file is still ingested, without a label, and the note saying why counts towards the report. Notes
  never quote the label or the value it matched.
* **One label per patient** is a pattern no single file shows: :func:`labels_per_patient_warning` looks
  at a whole ingest and says when the labels look like patient or series names.

The identifying values come from the reader (:attr:`medvae.data.readers.DecodedImage.identifiers`) and
are used for this check only; they are never stored or logged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medvae.config import IngestConfig
    from medvae.data.readers import DecodedImage

__all__ = [
    "LABEL_NOTE",
    "Identifiers",
    "count_notes",
    "identifying_reason",
    "labels_per_patient_warning",
    "vet_label",
]

# Every note starts with this, so that reports and lineage can count withheld labels by prefix.
LABEL_NOTE = "label withheld"

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
# Three or more dot-separated numbers: a DICOM UID (1.2.840.113619...) or a fragment of one.
_UID = re.compile(r"\d+(?:\.\d+){2,}")
# Name components shorter than this are matched as whole tokens only ("LI" must not refuse "clinic").
_NAME_SUBSTRING_MIN = 4
# Identifiers shorter than this are too common to mean anything (a PatientID "1" in a test file).
_ID_MIN = 3


@dataclass(frozen=True)
class Identifiers:
    """The identifying values of one file, for vetting its label; never stored, never logged.

    Attributes:
        names: the components of PatientName (and OtherPatientNames), lowercased: family, given, middle,
            prefix, suffix, in every component group.
        ids: PatientID, OtherPatientIDs and AccessionNumber, lowercased, with separators removed.
        dates: every DA/DT date in the file's top-level data set, as ``YYYYMMDD``.
    """

    names: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    dates: frozenset[str] = frozenset()

    @staticmethod
    def compact(text: str) -> str:
        """``text`` lowercased with everything but letters and digits removed (how values are compared)."""
        return _NON_ALNUM.sub("", text.lower())


def identifying_reason(label: str, ident: Identifiers | None) -> str | None:
    """Why ``label`` must not be stored, or None when it may; the reason never quotes either value.

    Args:
        label: the candidate label.
        ident: the file's identifying values (None for files that have none, such as PNGs).

    Returns:
        A short reason such as ``"it matches the file's PatientName"``, or None.
    """
    lowered = label.lower()
    tokens = [t for t in _NON_ALNUM.split(lowered) if t]
    compact = "".join(tokens)
    if ident is not None:
        for name in ident.names:
            if name in tokens or (len(name) >= _NAME_SUBSTRING_MIN and name in compact):
                return "it matches the file's PatientName"
        if any(len(i) >= _ID_MIN and i in compact for i in ident.ids):
            return "it matches the file's PatientID or AccessionNumber"
        digits = re.sub(r"\D", "", lowered)
        if any(_date_in(d, digits) for d in ident.dates):
            return "it matches a date in the file"
    if _UID.search(lowered):
        return "it looks like a UID (dotted digits)"
    return _id_shape_reason(tokens, compact)


def _date_in(date: str, digits: str) -> bool:
    """Whether the ``YYYYMMDD`` ``date`` appears in ``digits`` as written in any common order."""
    y, m, d = date[:4], date[4:6], date[6:8]
    return any(form in digits for form in (y + m + d, d + m + y, m + d + y, y[2:] + m + d, d + m + y[2:]))


def _id_shape_reason(tokens: Sequence[str], compact: str) -> str | None:
    """Whether a label is shaped like an identifier rather than a class name."""
    n_digits = sum(c.isdigit() for c in compact)
    if n_digits >= 4 and n_digits * 2 >= len(compact):
        return "it looks like an ID (mostly digits)"
    for token in tokens:
        token_digits = sum(c.isdigit() for c in token)
        # "covid19", "grade3" and "t2w" stay class names; "zzq100", "ab12345" and "mrn0042" do not.
        if len(token) >= 6 and token_digits >= 3 and token_digits < len(token):
            return "it looks like an ID (a long run of letters and digits)"
    return None


def vet_label(
    label: str | None, images: Sequence[DecodedImage], cfg: IngestConfig
) -> tuple[str | None, str | None]:
    """The label to store for one decoded file, and a note when a label was withheld.

    Args:
        label: the label the walk gave the file (its folder name, or its labels-CSV entry).
        images: the file's decoded images (all frames share one header; the first is used).
        cfg: the ingest config (``labels_csv``, ``dicom_folder_labels``, ``vet_labels``).

    Returns:
        ``(label, None)`` when the label may be stored, ``(None, note)`` when it is withheld, where the
        note starts with :data:`LABEL_NOTE` and never quotes the label.
    """
    if label is None or not images:
        return label, None
    first = images[0]
    from_folder = cfg.labels_csv is None
    if from_folder and first.meta.get("source_format") == "dicom" and not cfg.dicom_folder_labels:
        return None, (
            f"{LABEL_NOTE}: folder names of DICOM files are not taken as labels (a PACS export names "
            "folders after patients and series); set dicom_folder_labels: true for class folders"
        )
    if cfg.vet_labels:
        why = identifying_reason(label, first.identifiers)
        if why is not None:
            return None, f"{LABEL_NOTE}: {why} (set vet_labels: false to keep such labels)"
    return label, None


def labels_per_patient_warning(
    labels: Iterable[str | None],
    patient_keys: Iterable[str | None],
    *,
    min_labels: int = 10,
    max_ratio: float = 0.5,
) -> str | None:
    """One line when the labels of an ingest look like one per patient (patient or series names).

    Class labels are few and each is shared by many patients; labels taken from the folders of a PACS
    export are many, and each belongs to one or two patients. The warning fires when there are more
    than ``min_labels`` distinct labels and at least ``max_ratio`` labels per labelled patient.

    Args:
        labels: the label of every stored row (None for unlabelled rows).
        patient_keys: the patient key of the same rows (None where unknown; such rows are left out).
        min_labels: how many distinct labels any dataset may have without suspicion.
        max_ratio: distinct labels per distinct patient at which the labels look per-patient.

    Returns:
        The warning, without label values, or None.
    """
    per_label: dict[str, set[str]] = {}
    for label, patient in zip(labels, patient_keys, strict=True):
        if label is not None and patient is not None:
            per_label.setdefault(label, set()).add(patient)
    patients = set().union(*per_label.values()) if per_label else set()
    n_labels = len(per_label)
    if n_labels <= min_labels or not patients or n_labels / len(patients) < max_ratio:
        return None
    single = sum(len(p) == 1 for p in per_label.values())
    return (
        f"labels look like one per patient: {n_labels} distinct labels for {len(patients)} patients "
        f"({single} labels belong to a single patient); folder names may be patient or series names "
        "(set labels: none, or give a labels_csv)"
    )


def count_notes(notes: Iterable[str | None]) -> dict[str, int]:
    """Label notes tallied by their reason (the text after the prefix), for reports and lineage."""
    reasons = (n.split(": ", 1)[1].split(" (", 1)[0] for n in notes if n and n.startswith(LABEL_NOTE))
    return dict(Counter(reasons))
