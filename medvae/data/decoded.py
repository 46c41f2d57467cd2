"""What a reader returns: a decoded image with its technical metadata, or the reason a file was refused.

Shared by the raster readers (:mod:`medvae.data.readers`) and the DICOM reader
(:mod:`medvae.data.dicom_reader`), so that neither needs the other's decoder stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medvae.data.deid import ALLOWED_META
from medvae.data.labels import Identifiers

__all__ = ["META_KEYS", "DecodedImage", "RejectedInput", "decoder_failure", "empty_meta"]

# The only keys ever present in DecodedImage.meta: the de-identification allow-list itself, so that the
# readers and the filter applied before storing can never disagree.
META_KEYS: frozenset[str] = frozenset(ALLOWED_META)


class RejectedInput(Exception):
    """A file that cannot or must not become a scan; str(exc) is a reason a person can act on."""

    def __init__(self, reason: str) -> None:
        # Passing reason to Exception keeps the exception picklable, so it crosses process pools intact.
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded, windowed greyscale image and the technical facts about where it came from.

    ``pixels`` is float32, 2-D, in ``[0, 1]``, windowed, with bright = dense (MONOCHROME2 sense), at
    the stored resolution, except that a JPEG may come out DCT-downscaled by 2, 4 or 8 (to no less
    than twice the configured output side; ``meta`` still gives the original size).

    ``patient_ref`` (the raw PatientID) and ``identifiers`` (the patient's name components, IDs and the
    file's dates) are identifying and must never be stored or logged: the first is for the caller to
    replace with a keyed hash, the second only for refusing labels that name the patient
    (:func:`medvae.data.labels.vet_label`). Both are None for PNG/JPEG files. ``notes`` says what the
    screens saw in a file they let through (burned-in text with ``burned_in_text: ingest``).

    ``eq=False``: equality and hashing by identity, since field-wise comparison of arrays is ambiguous.
    """

    pixels: np.ndarray
    meta: dict[str, Any]
    patient_ref: str | None
    frame_index: int
    n_frames: int
    identifiers: Identifiers | None = None
    notes: tuple[str, ...] = ()


def decoder_failure(exc: BaseException) -> str:
    """A decoder failure named by its exception class only.

    The message is left out on purpose: decoders quote what they choke on (a value, a VR, bytes of the
    stream), and a reason is tallied into the store's lineage and printed in logs.
    """
    return f"{type(exc).__name__} raised by the decoder"


def empty_meta(source_format: str) -> dict[str, Any]:
    """Every :data:`META_KEYS` key set to None, and the source format."""
    meta: dict[str, Any] = dict.fromkeys(sorted(META_KEYS))
    meta["source_format"] = source_format
    return meta
