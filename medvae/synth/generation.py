"""Synthetic images from the prior, a nearest-neighbour privacy filter, synthetic DICOM and picture grids."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medvae.anomaly.scoring import (
    Device,
    ImageBatch,
    Labels,
    as_float_batch,
    eval_mode,
    model_device,
    resolve_labels,
    to_uint8,
    write_png,
)
from medvae.vae.model import ConvVAE

# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    model: ConvVAE,
    n: int,
    *,
    label_index: int | None = None,
    seed: int,
    device: Device = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Decode ``n`` draws from the prior N(0, I) into uint8 images.

    The latent codes are drawn on the CPU from a generator seeded with ``seed`` before anything moves
    to the device, so the same seed gives the same codes on any device and for any ``batch_size``
    (decoded pixels can still differ in the last bit between CPU and GPU kernels).

    Args:
        model: the VAE (put in eval mode for the call, so BatchNorm uses running statistics).
        n: how many images.
        label_index: the class to sample for a conditional model; must be None for an unconditional one.
        seed: the random seed.
        device: where to decode (the model is moved there); None: the model's device.
        batch_size: codes decoded per pass.

    Returns:
        uint8 array (n, H, W).

    Raises:
        ValueError: for negative ``n``, a conditional model without ``label_index`` or an unconditional
            one with it (it would silently be ignored otherwise).
    """
    if n < 0 or batch_size < 1:
        raise ValueError("n must be >= 0 and batch_size >= 1")
    if label_index is not None and not model.n_cond:
        raise ValueError("label_index given, but this VAE is unconditional")
    if model.n_cond and label_index is None:
        raise ValueError("this VAE is conditional: pass label_index, the class to sample")
    dev = model_device(model, device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    z_all = torch.randn(n, model.latent_dim, generator=gen)
    y_all = resolve_labels(model, None, n, label_index)
    size = model.cfg.image_size
    out: list[np.ndarray] = [np.zeros((0, size, size), dtype=np.uint8)]
    dtype = next(model.parameters()).dtype
    with eval_mode(model):
        for start in range(0, n, batch_size):
            z = z_all[start : start + batch_size].to(dev, dtype)
            y = None if y_all is None else y_all[start : start + batch_size].to(dev)
            out.append(to_uint8(model.decode(z, y)))
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------------------
# Nearest-neighbour privacy filter
# --------------------------------------------------------------------------------------------------------


def _flat(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    # uint8 pairs stay on the 0..255 integer scale: every product and partial sum is then an integer far
    # below 2**53, so float64 BLAS computes squared distances *exactly* (an exact copy gives exactly 0,
    # which [0, 1]-scaled floats do not, whatever the summation order). Returns the value scale too.
    q, r = np.asarray(query), np.asarray(reference)
    if q.ndim < 2 or r.ndim < 2:
        raise ValueError(f"expected stacks of images (n, ...), got shapes {q.shape} and {r.shape}")
    scale = 255.0 if q.dtype == np.uint8 and r.dtype == np.uint8 else 1.0

    def flat(a: np.ndarray) -> np.ndarray:
        f = a.reshape(len(a), -1).astype(np.float64)
        return f / 255.0 if a.dtype == np.uint8 and scale == 1.0 else f

    return flat(q), flat(r), scale


def nearest_neighbour_distances(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> np.ndarray:
    """RMS pixel distance from each query image to its nearest reference image.

    Distance is the Euclidean distance of [0, 1] pixel vectors divided by sqrt(H·W), i.e. the
    root-mean-square pixel difference, so thresholds do not depend on image size. It is computed as
    ||a||² + ||b||² - 2ab in float64, chunk by chunk, on the integer 0..255 scale for uint8 input: there
    the arithmetic is exact, so cancellation cannot blur the small distances (near-copies) the privacy
    filter exists to catch, and an exact copy has distance exactly 0.

    Args:
        query: uint8 (n, H, W) (float in [0, 1] also accepted).
        reference: uint8 (m, H, W).
        exclude_self: query and reference are the same images; ignore each image's distance to itself
            (for train-to-train distances). Exact duplicates at other indices still count.
        chunk: query rows per matrix product (memory: chunk × m float64).

    Returns:
        Float64 array (n,); +inf where the reference is empty (or holds only the image itself).

    Raises:
        ValueError: for mismatched image shapes, or ``exclude_self`` with arrays of different lengths.
    """
    q, r, scale = _flat(query, reference)
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"query and reference images differ in size: {query.shape[1:]} vs {reference.shape[1:]}"
        )
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self needs query and reference to be the same images")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    out = np.full(len(q), np.inf)
    if len(q) == 0 or len(r) == 0:
        return out
    r_sq = np.einsum("ij,ij->i", r, r)
    for start in range(0, len(q), chunk):
        qc = q[start : start + chunk]
        d2 = np.einsum("ij,ij->i", qc, qc)[:, None] + r_sq[None, :] - 2.0 * (qc @ r.T)
        np.maximum(d2, 0.0, out=d2)  # cancellation can leave tiny negatives for (near-)identical images
        if exclude_self:
            rows = np.arange(len(qc))
            d2[rows, start + rows] = np.inf
        out[start : start + len(qc)] = d2.min(axis=1)
    return np.sqrt(out / q.shape[1]) / scale


def privacy_threshold(train: np.ndarray, quantile: float, max_reference: int = 5000, seed: int = 0) -> float:
    """The ``quantile`` of train-to-train nearest-neighbour distances: how close distinct real images get.

    A synthetic image closer to a training image than this is "closer than real patients are to each
    other" and is treated as a possible memorised copy.

    For speed, a training set larger than ``max_reference`` is subsampled (without replacement, seeded)
    and distances are taken within the subsample. A sparser set has larger nearest-neighbour distances,
    so subsampling can only raise the threshold: the filter gets stricter, never laxer.

    Exact duplicates inside the training set (distance 0) are left out of the quantile: they measure
    duplication in the data, not how close distinct images are, and would otherwise pull the threshold
    to 0 and let exact copies through.

    Args:
        train: uint8 training images (n, H, W), n >= 2.
        quantile: in [0, 1], e.g. ``AugmentConfig.privacy_quantile``.
        max_reference: the largest number of training images compared all-pairs.
        seed: seed of the subsample.

    Returns:
        The distance threshold (RMS pixel distance in [0, 1] units).

    Raises:
        ValueError: for a quantile outside [0, 1] or fewer than 2 training images.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    train = np.asarray(train)
    if len(train) < 2 or max_reference < 2:
        raise ValueError("privacy_threshold needs at least 2 training images (and max_reference >= 2)")
    if len(train) > max_reference:
        idx = np.random.default_rng(seed).choice(len(train), size=max_reference, replace=False)
        train = train[np.sort(idx)]
    d = nearest_neighbour_distances(train, train, exclude_self=True)
    d = d[d > 0.0]
    return float(np.quantile(d, quantile)) if d.size else 0.0


@dataclass(eq=False)
class FilterResult:
    """Outcome of :func:`privacy_filter`.

    Attributes:
        keep: bool (n,), True for samples that may be released.
        distances: float64 (n,), each sample's RMS distance to its nearest training image.
        threshold: the distance below which samples were rejected.
        rejection_rate: the share of samples rejected (0 for no samples).
    """

    keep: np.ndarray
    distances: np.ndarray
    threshold: float
    rejection_rate: float


def privacy_filter(samples: np.ndarray, train: np.ndarray, threshold: float) -> FilterResult:
    """Reject samples strictly closer than ``threshold`` to some training image (exact copies always).

    Args:
        samples: uint8 synthetic images (n, H, W).
        train: uint8 training images (m, H, W), all of them (the comparison is chunked).
        threshold: from :func:`privacy_threshold`.

    Returns:
        Which samples to keep, their distances and the rejection rate.
    """
    dist = nearest_neighbour_distances(samples, train)
    # d > 0 as well: an exact copy is never released, even under a threshold of 0.
    keep = (dist >= threshold) & (dist > 0.0)
    rate = float(1.0 - keep.mean()) if len(keep) else 0.0
    return FilterResult(keep=keep, distances=dist, threshold=float(threshold), rejection_rate=rate)


# --------------------------------------------------------------------------------------------------------
# Synthetic DICOM
# --------------------------------------------------------------------------------------------------------


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        _atomic_write_bytes(buf.getvalue(), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------------
# Picture grids
# --------------------------------------------------------------------------------------------------------


def _grid(images: np.ndarray, nrow: int, pad: int, pad_value: int) -> np.ndarray:
    n, h, w = images.shape
    cols = min(n, nrow)
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = images[k]
    return grid


def save_grid(images: np.ndarray, path: Path, nrow: int = 8, pad: int = 2, pad_value: int = 0) -> Path:
    """Write uint8 images (n, H, W) as one PNG grid, ``nrow`` images per row, atomically.

    The picture is ``min(n, nrow) * (W + pad) + pad`` wide and ``ceil(n / nrow) * (H + pad) + pad`` high.

    Args:
        images: uint8 (n, H, W), n >= 1.
        path: the PNG to write (its folder is created if needed).
        nrow: images per row.
        pad: pixels between and around images.
        pad_value: grey level of the padding.

    Returns:
        ``path``.

    Raises:
        ValueError: for an empty, non-uint8 or non-3-D array, or nrow < 1 / pad < 0.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 array (n, H, W), got {images.dtype} {images.shape}")
    if nrow < 1 or pad < 0:
        raise ValueError("nrow must be >= 1 and pad >= 0")
    return write_png(_grid(images, nrow, pad, pad_value), Path(path))


@torch.no_grad()
def reconstruction_grid(
    model: ConvVAE,
    images: ImageBatch,
    path: Path,
    labels: Labels = None,
    n: int = 16,
    *,
    nrow: int = 8,
    default_label: int | None = None,
    device: Device = None,
) -> Path:
    """A PNG of the first ``n`` images and their reconstructions from the posterior mean.

    Rows alternate: up to ``nrow`` originals, then their reconstructions directly below.

    Args:
        model: the VAE.
        images: see :func:`medvae.anomaly.scoring.as_float_batch`.
        path: the PNG to write.
        labels: label indices for a conditional model.
        n: how many images to show.
        nrow: images per row.
        default_label: the label for images without one (conditional models only).
        device: where to compute; None: the model's device.

    Returns:
        ``path``.
    """
    k = min(n, len(images))
    if k < 1:
        raise ValueError("reconstruction_grid needs at least one image")
    dev = model_device(model, device)
    x = as_float_batch(images[:k]).to(dev)
    lab = None if labels is None else labels[:k]
    y = resolve_labels(model, lab, k, default_label)
    with eval_mode(model):
        recon = model(x, None if y is None else y.to(dev)).recon
    orig, rec = to_uint8(x), to_uint8(recon)
    cols = min(k, nrow)
    blank = np.zeros((cols, *orig.shape[1:]), dtype=np.uint8)
    tiles: list[np.ndarray] = []
    for start in range(0, k, cols):
        # Pad a short last row with blanks so each reconstruction sits right below its original.
        for part in (orig[start : start + cols], rec[start : start + cols]):
            tiles.append(np.concatenate([part, blank[: cols - len(part)]], axis=0))
    return save_grid(np.concatenate(tiles, axis=0), path, nrow=cols)


@torch.no_grad()
def interpolation_grid(
    model: ConvVAE,
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
    steps: int = 8,
    label: int | None = None,
    *,
    device: Device = None,
) -> Path:
    """A PNG walking the latent space between pairs of images, one row per pair.

    Each row shows image a, then ``steps`` decodings of (1 - t)·μ(a) + t·μ(b) for t evenly spaced in
    [0, 1] (so the ends are the reconstructions of a and b), then image b.

    Args:
        model: the VAE.
        a: uint8 (H, W) or several (k, H, W).
        b: the same shape as ``a``.
        path: the PNG to write.
        steps: decoded images per row, >= 2.
        label: the label index for a conditional model (the same for every image).
        device: where to compute; None: the model's device.

    Returns:
        ``path``.
    """
    xa, xb = as_float_batch(a), as_float_batch(b)
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    if steps < 2:
        raise ValueError("steps must be >= 2")
    k = xa.shape[0]
    dev = model_device(model, device)
    xa, xb = xa.to(dev), xb.to(dev)
    y = resolve_labels(model, None, k, label)
    y = None if y is None else y.to(dev)
    t = torch.linspace(0.0, 1.0, steps, device=dev)
    with eval_mode(model):
        mu_a, _ = model.encode(xa, y)
        mu_b, _ = model.encode(xb, y)
        # (k, steps, d): every pair walks the same t grid.
        z = mu_a[:, None, :] + t[None, :, None] * (mu_b - mu_a)[:, None, :]
        y_rep = None if y is None else y.repeat_interleave(steps)
        dec = model.decode(z.reshape(k * steps, -1), y_rep)
    walk = to_uint8(dec).reshape(k, steps, *dec.shape[-2:])
    rows = np.concatenate([to_uint8(xa)[:, None], walk, to_uint8(xb)[:, None]], axis=1)
    return save_grid(rows.reshape(-1, *rows.shape[2:]), path, nrow=steps + 2)
