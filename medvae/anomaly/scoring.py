"""Latent-space anomaly scores, their calibration on held-out normals, and reconstruction-error heat maps."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from medvae.vae.losses import kl_divergence, reconstruction_nll
from medvae.vae.model import ConvVAE

SCORES = ("mahalanobis", "kl", "recon", "elbo")

ImageBatch = np.ndarray | torch.Tensor
Labels = np.ndarray | torch.Tensor | Sequence[int] | None
Device = str | torch.device | None

_CALIBRATION_FORMAT = "medvae.calibration/1"


# --------------------------------------------------------------------------------------------------------
# Shared helpers (generation.py reuses them, so they are public)
# --------------------------------------------------------------------------------------------------------


def as_float_batch(images: ImageBatch) -> torch.Tensor:
    """Bring images into the model's input form: a float32 tensor (N, 1, H, W) in [0, 1].

    Args:
        images: uint8 arrays/tensors in 0..255 or float arrays/tensors in [0, 1], shaped (H, W),
            (N, H, W) or (N, 1, H, W).

    Returns:
        A float32 tensor on the same device as a tensor input (CPU for numpy input).

    Raises:
        ValueError: for an unsupported dtype or shape, or float values outside [0, 1].
    """
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype == torch.uint8:
        x = t.float().div_(255.0)
    elif t.is_floating_point():
        x = t.float()
        # Float input is taken as already scaled; values outside [0, 1] mean someone passed raw 0..255
        # floats or un-normalised data, which BCE and the uint8 round trip would silently mangle.
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError("float images must lie in [0, 1]; pass uint8 for 0..255 data")
    else:
        raise ValueError(f"images must be uint8 or floating point, got {t.dtype}")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images shaped (H, W), (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1], (N, 1, H, W), as a uint8 numpy array (N, H, W) (rounded, clamped)."""
    return x.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).squeeze(1).cpu().numpy()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards.

    Eval mode matters twice here: BatchNorm must use its running statistics (so one image's score does
    not depend on the rest of its batch) and the VAE's forward pass must use the posterior mean.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module, device: Device) -> torch.device:
    """The device to compute on: ``device`` (moving the model there, in place) or the model's own device."""
    if device is None:
        return next(model.parameters()).device
    dev = torch.device(device)
    model.to(dev)
    return dev


def resolve_labels(model: ConvVAE, labels: Labels, n: int, default_label: int | None) -> torch.Tensor | None:
    """Label indices for a conditional model, or None for an unconditional one.

    A CVAE encodes and decodes *given* a label. New scans to screen have no trusted label, so the caller
    names the class to score against (normally the normal class) as ``default_label``; it also fills
    rows marked unlabelled (negative, as :class:`medvae.data.dataset.StoreDataset` marks them).

    Args:
        model: the VAE.
        labels: one label index per image, or None.
        n: the number of images.
        default_label: the label index to use where none is given.

    Returns:
        A CPU int64 tensor (n,) for a conditional model; None for an unconditional one (labels ignored).

    Raises:
        ValueError: when a conditional model gets neither labels nor ``default_label``, the wrong number
            of labels, or an index out of range.
    """
    if not model.n_cond:
        return None
    if labels is None:
        if default_label is None:
            raise ValueError(
                "this VAE is conditional: pass one label index per image, or default_label (e.g. the "
                "normal class index) to score every image against that class"
            )
        y = torch.full((n,), int(default_label), dtype=torch.long)
    else:
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        y = y.detach().cpu().long().reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"got {y.shape[0]} labels for {n} images")
        if (y < 0).any():
            if default_label is None:
                raise ValueError("some labels are unknown (negative); pass default_label to fill them")
            y = torch.where(y < 0, torch.full_like(y, int(default_label)), y)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= model.n_cond):
        raise ValueError(f"label indices must lie in 0..{model.n_cond - 1}")
    return y


def _batches(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels,
    default_label: int | None,
    batch_size: int,
    dev: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    # Convert chunk by chunk: a float copy of a whole store version would be 4x the uint8 size in memory.
    n = len(images)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    y_all = resolve_labels(model, labels, n, default_label)
    for start in range(0, n, batch_size):
        x = as_float_batch(images[start : start + batch_size]).to(dev)
        y = None if y_all is None else y_all[start : start + batch_size].to(dev)
        yield x, y


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically (temp file in the same folder, rename).

    A reader (or a crash) never sees a half-written picture, and an existing file is replaced whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(image)).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------------
# Latent statistics and scores
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # eq on numpy fields would raise "truth value of an array is ambiguous"
class LatentStats:
    """Mean and (shrunk) precision of posterior means, the reference for Mahalanobis scores.

    Attributes:
        mean: the mean posterior mean, shape (d,).
        precision: the inverse of the Ledoit-Wolf-shrunk covariance, shape (d, d), symmetric positive
            definite.
        shrinkage: the Ledoit-Wolf weight on the scaled identity (0: empirical covariance, 1: identity).
        n_images: how many images the statistics were fitted on.
    """

    mean: np.ndarray
    precision: np.ndarray
    shrinkage: float = 0.0
    n_images: int = 0


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and Ledoit-Wolf shrunk covariance of the rows of ``x``.

    The shrinkage target is ``mu * I`` with ``mu = trace(S) / d``; the weight is the closed-form
    estimate of Ledoit & Wolf (2004), the same formula scikit-learn uses. With fewer samples than
    dimensions the empirical covariance is singular, and shrinkage keeps it invertible.

    Args:
        x: samples, shape (n, d), n >= 2.

    Returns:
        ``(mean (d,), covariance (d, d), shrinkage)``, in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / d
    # delta: distance of S from the target; beta: how noisy S itself is (its estimation variance).
    delta = float(np.sum((s - mu * np.eye(d)) ** 2)) / d
    beta = (float(np.sum(np.sum(xc**2, axis=1) ** 2)) / n - float(np.sum(s**2))) / (n * d)
    shrink = 0.0 if delta <= 0.0 else min(max(beta, 0.0), delta) / delta
    cov = (1.0 - shrink) * s + shrink * mu * np.eye(d)
    return mean, cov, shrink


def _precision(cov: np.ndarray) -> np.ndarray:
    # A tiny ridge on top of shrinkage: if every code is identical (mu = 0) the shrunk covariance is 0,
    # and a relative ridge alone would not help. Eigen-decomposition keeps the inverse exactly symmetric.
    d = cov.shape[0]
    scale = max(float(np.trace(cov)) / d, 0.0)
    cov = cov + (1e-6 * scale + 1e-12) * np.eye(d)
    w, v = np.linalg.eigh((cov + cov.T) / 2.0)
    w = np.maximum(w, 1e-12 * max(scale, 1.0))
    p = (v / w) @ v.T
    return np.asarray((p + p.T) / 2.0, dtype=np.float64)


@torch.no_grad()
def posterior_means(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> np.ndarray:
    """Posterior means μ(x) of the images, in eval mode.

    Args:
        model: the VAE.
        images: see :func:`as_float_batch`.
        labels: label indices for a conditional model (see :func:`resolve_labels`).
        default_label: the label for images without one (conditional models only).
        batch_size: images per forward pass.
        device: where to compute (the model is moved there); None: the model's device.

    Returns:
        Float64 array (N, latent_dim).
    """
    dev = model_device(model, device)
    out: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    with eval_mode(model):
        for x, y in _batches(model, images, labels, default_label, batch_size, dev):
            mu, _ = model.encode(x, y)
            out.append(mu.double().cpu().numpy())
    return np.concatenate(out, axis=0)


def fit_latent_stats(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> LatentStats:
    """Fit the Mahalanobis reference on the posterior means of training images.

    Fit on the images the model was trained on (normal ones only when it was trained on normals), then
    calibrate the threshold on *held-out* normals: scores of the fitting images are optimistically low.

    Args:
        model: the VAE.
        images: the training images (at least 2).
        labels: label indices for a conditional model.
        default_label: the label for images without one (conditional models only).
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        The mean and Ledoit-Wolf-shrunk precision of the posterior means.

    Raises:
        ValueError: with fewer than 2 images.
    """
    if len(images) < 2:
        raise ValueError("fit_latent_stats needs at least 2 images")
    mu = posterior_means(
        model, images, labels, default_label=default_label, batch_size=batch_size, device=device
    )
    mean, cov, shrink = ledoit_wolf(mu)
    return LatentStats(mean=mean, precision=_precision(cov), shrinkage=shrink, n_images=len(mu))


def mahalanobis(mu: np.ndarray, stats: LatentStats) -> np.ndarray:
    """sqrt((μ - m)ᵀ P (μ - m)) for each row of ``mu`` (float64, (N,))."""
    diff = np.asarray(mu, dtype=np.float64) - stats.mean
    q = np.einsum("ni,ij,nj->n", diff, stats.precision, diff)
    # Rounding can push a near-zero quadratic form slightly negative; sqrt would then give NaN.
    return np.sqrt(np.maximum(q, 0.0))


@torch.no_grad()
def score_batch(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    *,
    stats: LatentStats,
    recon_kind: Literal["bce", "mse"] = "bce",
    default_label: int | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> dict[str, np.ndarray]:
    """Every anomaly score in :data:`SCORES` for each image; higher means more unusual.

    All scores use the deterministic eval-mode pass (z = posterior mean), so an image always gets the
    same score. The model's train/eval mode is restored afterwards.

    Args:
        model: the VAE.
        images: see :func:`as_float_batch`.
        labels: label indices for a conditional model (see :func:`resolve_labels`).
        stats: the latent reference from :func:`fit_latent_stats`.
        recon_kind: the reconstruction likelihood, as in training (``LossConfig.reconstruction``).
        default_label: the label to score against where none is given (conditional models only).
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        ``{"mahalanobis", "kl", "recon", "elbo"}`` → float64 arrays (N,): Mahalanobis distance of the
        posterior mean, KL(q(z|x) || N(0, I)), reconstruction NLL from the posterior mean, and their
        sum recon + kl (the negative ELBO with the posterior mean standing in for the expectation).
    """
    dev = model_device(model, device)
    mus: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    kls: list[np.ndarray] = [np.zeros(0)]
    recs: list[np.ndarray] = [np.zeros(0)]
    with eval_mode(model):
        for x, y in _batches(model, images, labels, default_label, batch_size, dev):
            out = model(x, y)
            mus.append(out.mu.double().cpu().numpy())
            kls.append(kl_divergence(out.mu.double(), out.logvar.double()).cpu().numpy())
            recs.append(reconstruction_nll(out, x, recon_kind).double().cpu().numpy())
    kl = np.concatenate(kls).astype(np.float64)
    recon = np.concatenate(recs).astype(np.float64)
    return {
        "mahalanobis": mahalanobis(np.concatenate(mus, axis=0), stats),
        "kl": kl,
        "recon": recon,
        "elbo": recon + kl,
    }


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Calibration:
    """An anomaly threshold calibrated on held-out normal images.

    Attributes:
        score: the primary score, one of :data:`SCORES`.
        threshold: images with ``score > threshold`` are flagged.
        fpr: the target false-positive rate on normals.
        normal_scores: the held-out normal images' primary scores, sorted ascending (for percentiles).
        stats: the latent reference the Mahalanobis score needs.
        n_val: how many held-out normals the threshold came from.
        recon_kind: the reconstruction likelihood the recon/elbo scores were computed with.
        default_label: for a conditional model, the label index new scans are scored against.
    """

    score: str
    threshold: float
    fpr: float
    normal_scores: np.ndarray
    stats: LatentStats
    n_val: int
    recon_kind: Literal["bce", "mse"] = "bce"
    default_label: int | None = None

    def to_files(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Split into JSON metadata and float64 tensors (e.g. calibration.json + calibration.safetensors).

        Returns:
            ``(metadata, tensors)``: plain JSON types, and contiguous CPU tensors that own their memory.
        """
        meta: dict[str, Any] = {
            "format": _CALIBRATION_FORMAT,
            "score": self.score,
            "threshold": float(self.threshold),
            "fpr": float(self.fpr),
            "n_val": int(self.n_val),
            "recon_kind": self.recon_kind,
            "default_label": None if self.default_label is None else int(self.default_label),
            "latent_dim": int(self.stats.mean.shape[0]),
            "shrinkage": float(self.stats.shrinkage),
            "n_train": int(self.stats.n_images),
        }

        def t(a: np.ndarray) -> torch.Tensor:
            # clone(): the tensors must not alias this object's arrays, or saving code could mutate them.
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).clone()

        tensors = {
            "normal_scores": t(self.normal_scores),
            "stats_mean": t(self.stats.mean),
            "stats_precision": t(self.stats.precision),
        }
        return meta, tensors

    @classmethod
    def from_files(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Calibration:
        """Rebuild a calibration from the output of :meth:`to_files`.

        Raises:
            ValueError: for an unknown format, a missing tensor or inconsistent shapes.
        """
        if meta.get("format") != _CALIBRATION_FORMAT:
            raise ValueError(f"not a {_CALIBRATION_FORMAT} calibration: format={meta.get('format')!r}")
        missing = {"normal_scores", "stats_mean", "stats_precision"} - set(tensors)
        if missing:
            raise ValueError(f"calibration tensors missing: {sorted(missing)}")

        def a(name: str) -> np.ndarray:
            return np.asarray(tensors[name].detach().cpu().to(torch.float64).numpy(), dtype=np.float64).copy()

        mean, precision, normal = a("stats_mean"), a("stats_precision"), a("normal_scores")
        d = int(meta["latent_dim"])
        if mean.shape != (d,) or precision.shape != (d, d):
            raise ValueError(f"calibration stats have shapes {mean.shape}, {precision.shape}; latent_dim={d}")
        if normal.ndim != 1 or normal.shape[0] != int(meta["n_val"]) or np.any(np.diff(normal) < 0):
            raise ValueError("calibration normal_scores must be a sorted 1-D array of n_val scores")
        if meta["score"] not in SCORES or meta["recon_kind"] not in ("bce", "mse"):
            raise ValueError(f"unknown score {meta['score']!r} or recon_kind {meta['recon_kind']!r}")
        default = meta.get("default_label")
        return cls(
            score=str(meta["score"]),
            threshold=float(meta["threshold"]),
            fpr=float(meta["fpr"]),
            normal_scores=normal,
            stats=LatentStats(
                mean=mean,
                precision=precision,
                shrinkage=float(meta.get("shrinkage", 0.0)),
                n_images=int(meta.get("n_train", 0)),
            ),
            n_val=int(meta["n_val"]),
            recon_kind=meta["recon_kind"],
            default_label=None if default is None else int(default),
        )


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of normal scores, interpolation ``"higher"``.

    "higher" picks an observed score at or above the exact quantile position, so at most
    ``fpr`` of these normals score strictly above the threshold (linear interpolation could land
    between two scores and flag one more).
    """
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - fpr, method="higher"))


def calibrate(
    model: ConvVAE,
    train_images: ImageBatch,
    val_normal_images: ImageBatch,
    *,
    train_labels: Labels = None,
    val_labels: Labels = None,
    score: str = "mahalanobis",
    fpr: float = 0.05,
    recon_kind: Literal["bce", "mse"] = "bce",
    default_label: int | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> Calibration:
    """Fit latent statistics on training images and set the threshold on held-out normal images.

    Args:
        model: the trained VAE.
        train_images: the images the model was trained on (the latent reference).
        val_normal_images: held-out normal images, never seen in training (the threshold).
        train_labels: label indices of ``train_images`` for a conditional model.
        val_labels: label indices of ``val_normal_images`` for a conditional model.
        score: the primary score, one of :data:`SCORES`.
        fpr: the share of held-out normals allowed above the threshold, in (0, 1).
        recon_kind: the reconstruction likelihood used in training.
        default_label: for a conditional model, the label index to score unlabelled images against
            (normally the normal class); stored so :func:`screen` uses it for new scans.
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        The calibration; see :func:`threshold_at_fpr` for how the threshold is chosen.

    Raises:
        ValueError: for an unknown score, an fpr outside (0, 1) or no validation images.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    if len(val_normal_images) < 1:
        raise ValueError("calibrate needs at least one held-out normal image")
    stats = fit_latent_stats(
        model, train_images, train_labels, default_label=default_label, batch_size=batch_size, device=device
    )
    val = score_batch(
        model,
        val_normal_images,
        val_labels,
        stats=stats,
        recon_kind=recon_kind,
        default_label=default_label,
        batch_size=batch_size,
        device=device,
    )[score]
    normal = np.sort(val)
    return Calibration(
        score=score,
        threshold=threshold_at_fpr(normal, fpr),
        fpr=float(fpr),
        normal_scores=normal,
        stats=stats,
        n_val=len(normal),
        recon_kind=recon_kind,
        default_label=default_label,
    )


def percentile_among_normals(scores: np.ndarray, cal: Calibration) -> np.ndarray:
    """The share (0..100) of held-out normal images whose score is <= each given score.

    Args:
        scores: primary scores, any shape.
        cal: the calibration holding the sorted normal scores.

    Returns:
        Float64 percentiles of the same shape; 100 at or above the largest normal score.
    """
    s = np.asarray(scores, dtype=np.float64)
    rank = np.searchsorted(cal.normal_scores, s, side="right")
    return 100.0 * rank.astype(np.float64) / max(len(cal.normal_scores), 1)


def screen(
    model: ConvVAE,
    images: ImageBatch,
    cal: Calibration,
    labels: Labels = None,
    device: Device = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Score new images against a calibration and flag the unusual ones.

    For a conditional model, images without labels are scored against ``default_label`` or else the
    calibration's ``default_label`` (the normal class): "how unusual is this *as a normal scan*".

    Args:
        model: the trained VAE.
        images: see :func:`as_float_batch`.
        cal: from :func:`calibrate`.
        labels: label indices for a conditional model, when known.
        device: where to compute; None: the model's device.
        default_label: overrides ``cal.default_label``.
        batch_size: images per forward pass.

    Returns:
        Every score in :data:`SCORES`, plus ``"score"`` (the primary one), ``"percentile"`` (among
        held-out normals, 0..100) and ``"flag"`` (bool, ``score > threshold``).
    """
    label = cal.default_label if default_label is None else default_label
    out = score_batch(
        model,
        images,
        labels,
        stats=cal.stats,
        recon_kind=cal.recon_kind,
        default_label=label,
        batch_size=batch_size,
        device=device,
    )
    primary = out[cal.score]
    out["score"] = primary
    out["percentile"] = percentile_among_normals(primary, cal)
    out["flag"] = primary > cal.threshold
    return out


# --------------------------------------------------------------------------------------------------------
# Heat maps
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def heatmaps(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    device: Device = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-pixel reconstruction error |x - recon| with recon decoded from the posterior mean.

    Args:
        model: the VAE.
        images: see :func:`as_float_batch`.
        labels: label indices for a conditional model.
        device: where to compute; None: the model's device.
        default_label: the label for images without one (conditional models only).
        batch_size: images per forward pass.

    Returns:
        Float32 array (N, H, W) in [0, 1].
    """
    dev = model_device(model, device)
    maps: list[np.ndarray] = []
    with eval_mode(model):
        for x, y in _batches(model, images, labels, default_label, batch_size, dev):
            out = model(x, y)
            maps.append((x - out.recon).abs().squeeze(1).float().cpu().numpy())
    if not maps:
        size = model.cfg.image_size
        return np.zeros((0, size, size), dtype=np.float32)
    return np.concatenate(maps, axis=0).astype(np.float32)


# Anchor colours of matplotlib's "inferno" at 0, 1/8, ..., 1 (matplotlib is not a dependency); linear
# interpolation between them is close enough for a perceptually ordered dark-to-bright heat scale.
_INFERNO_ANCHORS = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def inferno_lut() -> np.ndarray:
    """A 256-entry uint8 RGB lookup table approximating matplotlib's "inferno"."""
    pos = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    t = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(t, pos, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.asarray(np.round(lut), dtype=np.uint8)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str, fallback: str, max_len: int = 120) -> str:
    """A file-name stem made of [A-Za-z0-9._-] only, without leading dots (no hidden files, no '..')."""
    stem = _SAFE_NAME.sub("_", str(name)).lstrip(".")[:max_len]
    return stem or fallback


def save_heatmap_pngs(
    images: np.ndarray,
    maps: np.ndarray,
    out_dir: Path,
    names: list[str],
    *,
    vmax: float | None = None,
    scale: int = 4,
    gap: int = 2,
) -> list[Path]:
    """Write one PNG per image: the image (grey) and its heat map (inferno) side by side.

    All maps share one colour scale (``vmax``), so a brighter map means a larger error than a darker
    one in another file; per-image scaling would make every map look equally alarming.

    Args:
        images: uint8 (N, H, W).
        maps: heat maps (N, H, W), e.g. from :func:`heatmaps`.
        out_dir: the folder to write into (created if needed).
        names: one name per image; sanitised to [A-Za-z0-9._-] and de-duplicated, so files always
            land directly inside ``out_dir``.
        vmax: the error mapped to the brightest colour; None: the largest value in ``maps``.
        scale: nearest-neighbour upscaling factor (64 px is small on screen).
        gap: black pixels between the two panels (before scaling).

    Returns:
        The written paths, in input order.

    Raises:
        ValueError: for mismatched shapes or name counts.
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float64)
    if images.dtype != np.uint8 or images.ndim != 3 or maps.shape != images.shape:
        raise ValueError(
            f"need uint8 images (N, H, W) and maps of the same shape, got {images.shape}, {maps.shape}"
        )
    if len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if scale < 1 or gap < 0:
        raise ValueError("scale must be >= 1 and gap >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    top = float(maps.max()) if vmax is None and maps.size else float(vmax or 0.0)
    top = top if top > 0 else 1.0
    lut = inferno_lut()
    n, h, _ = images.shape
    used: set[str] = set()
    paths: list[Path] = []
    for i in range(n):
        stem = safe_name(names[i], f"image_{i:05d}")
        if stem.lower() in used:  # two names can sanitise to one; never overwrite an earlier picture
            stem = f"{stem}_{i:05d}"
        used.add(stem.lower())
        path = out_dir / f"{stem}.png"
        # Belt and braces: the sanitised stem cannot contain a separator, but check the final location.
        if path.resolve().parent != root:
            raise ValueError(f"refusing to write outside {out_dir}: {names[i]!r}")
        grey = np.repeat(images[i][:, :, None], 3, axis=2)
        idx = np.clip(np.round(maps[i] / top * 255.0), 0, 255).astype(np.uint8)
        panel = np.concatenate([grey, np.zeros((h, gap, 3), np.uint8), lut[idx]], axis=1)
        if scale > 1:
            panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
        paths.append(write_png(panel, path))
    return paths
