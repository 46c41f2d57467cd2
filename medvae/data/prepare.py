"""Decode -> normalise -> standardise: the one path from a scan file to the stored 64x64 image.

Ingest, screening and the evaluation all prepare scans here, so a scan screened straight from the
scanner is prepared exactly as the training images were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvae.config import IngestConfig


def normalised_image(img01: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    """A decoded, windowed ``[0, 1]`` image made square, resized and quantised (not yet standardised).

    Args:
        img01: a 2-D float image in ``[0, 1]`` from :mod:`medvae.data.readers`.
        cfg: the ingest settings (size, aspect policy).

    Returns:
        A uint8 array of shape ``(cfg.size, cfg.size)``.
    """
    from medvae.data.transforms import normalise

    return normalise(img01, cfg.size, cfg.aspect)


def standardised(images: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    """The configured intensity standardisation of a uint8 ``(N, size, size)`` stack, in one vectorised
    call (ingest standardises each decode batch at once).

    Args:
        images: normalised images from :func:`normalised_image`.
        cfg: the ingest settings (intensity, CLAHE clip limit).

    Returns:
        A uint8 stack of the same shape.
    """
    from medvae.data.transforms import standardise_batch

    return standardise_batch(images, cfg.intensity, cfg.clahe_clip_limit)


def stored_image(img01: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    """A decoded, windowed ``[0, 1]`` image in the form the store keeps: square, 64×64, standardised uint8.

    Args:
        img01: a 2-D float image in ``[0, 1]`` from :mod:`medvae.data.readers`.
        cfg: the ingest settings (size, aspect policy, intensity standardisation).

    Returns:
        A uint8 array of shape ``(cfg.size, cfg.size)``.
    """
    return standardised(normalised_image(img01, cfg)[None], cfg)[0]


def prepare_file(path: Path, cfg: IngestConfig, *, standardise: bool = True) -> np.ndarray:
    """Decode a scan file and prepare its (first, or only) image as the store keeps it.

    Args:
        path: a DICOM, PNG or JPEG file.
        cfg: the ingest settings.
        standardise: apply the configured intensity standardisation (False: square, resized uint8 only).

    Returns:
        A uint8 array of shape ``(cfg.size, cfg.size)``.

    Raises:
        RejectedInput: when the file cannot or must not be decoded; the reason says why.
    """
    from medvae.data.readers import decode_file

    img01 = decode_file(Path(path), cfg)[0].pixels
    return stored_image(img01, cfg) if standardise else normalised_image(img01, cfg)
