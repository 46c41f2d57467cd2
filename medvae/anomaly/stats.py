"""Latent statistics of normal images and the anomaly scores computed from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from medvae.engine.inference import Device, ImageBatch, Labels, eval_mode, iter_batches, model_device
from medvae.vae.losses import kl_divergence, reconstruction_nll
from medvae.vae.model import ConvVAE

SCORES = ("lowpass_error", "mahalanobis", "kl", "recon", "elbo")
# The score a new model is calibrated for and screens with unless told otherwise.
DEFAULT_SCORE = "lowpass_error"

# The low-pass error compares image and reconstruction after a Gaussian blur of this width (pixels at
# 64 px), inside the calibration's region of interest (the lung fields of a chest film). Unblurred, the
# error is dominated by rib edges and grain the decoder cannot reproduce; a 2 px blur keeps lung-sized
# structure (opacities, consolidation) and drops much of what only tracks a film's sharpness. Outside the
# lungs, the collimation edge, labels and shoulders held over half of a normal film's error and shift
# between acquisition batches. docs/quality.md has the measurements.
LOWPASS_SIGMA = 2.0


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


def precision_from_cov(cov: np.ndarray) -> np.ndarray:
    """The symmetric inverse of a (shrunk) covariance, with a tiny ridge."""
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
        for x, y in iter_batches(model, images, labels, default_label, batch_size, dev):
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
    return LatentStats(mean=mean, precision=precision_from_cov(cov), shrinkage=shrink, n_images=len(mu))


def gaussian_blur(x: torch.Tensor, sigma: float = LOWPASS_SIGMA) -> torch.Tensor:
    """A separable Gaussian blur of images (N, 1, H, W), edges mirrored as in scipy.ndimage's default.

    The kernel reaches 4 sigma each side (scipy's ``truncate=4``), clipped to the image size.
    """
    h, w = x.shape[-2:]
    radius = max(0, min(int(4.0 * sigma + 0.5), h, w))
    if sigma <= 0 or radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    # Half-sample symmetric padding (a b c | c b a), scipy's "reflect"; torch's own "reflect" skips the edge.
    x = torch.cat([x[..., :radius].flip(-1), x, x[..., -radius:].flip(-1)], dim=-1)
    x = torch.cat([x[..., :radius, :].flip(-2), x, x[..., -radius:, :].flip(-2)], dim=-2)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))


def lowpass_error_map(
    x: torch.Tensor, recon: torch.Tensor, roi: np.ndarray | None = None, sigma: float = LOWPASS_SIGMA
) -> torch.Tensor:
    """Per-pixel squared difference of the blurred image and the blurred reconstruction, (N, H, W).

    Args:
        x: images (N, 1, H, W) in [0, 1].
        recon: their reconstructions, same shape.
        roi: boolean (H, W); pixels outside it get 0. None or empty: the whole image.
        sigma: the blur's standard deviation in pixels.

    Returns:
        The map; its sum over pixels is the ``lowpass_error`` score.
    """
    err = (gaussian_blur(x, sigma) - gaussian_blur(recon, sigma)).pow(2).squeeze(1)
    if roi is not None and np.size(roi):
        err = err * torch.as_tensor(np.asarray(roi, dtype=bool), device=err.device).to(err.dtype)
    return err


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
    roi: np.ndarray | None = None,
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
        roi: the region the low-pass error counts, boolean (H, W) (``Calibration.roi``); None: all.
        default_label: the label to score against where none is given (conditional models only).
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        ``{"lowpass_error", "mahalanobis", "kl", "recon", "elbo"}`` → float64 arrays (N,): the squared
        error between image and reconstruction after a Gaussian blur (:data:`LOWPASS_SIGMA`) inside
        ``roi``, Mahalanobis distance of the posterior mean, KL(q(z|x) || N(0, I)), reconstruction NLL
        from the posterior mean, and their sum recon + kl (the negative ELBO with the posterior mean
        standing in for the expectation).
    """
    dev = model_device(model, device)
    mus: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    kls: list[np.ndarray] = [np.zeros(0)]
    recs: list[np.ndarray] = [np.zeros(0)]
    lows: list[np.ndarray] = [np.zeros(0)]
    with eval_mode(model):
        for x, y in iter_batches(model, images, labels, default_label, batch_size, dev):
            out = model(x, y)
            lows.append(lowpass_error_map(x.double(), out.recon.double(), roi).sum(dim=(1, 2)).cpu().numpy())
            mus.append(out.mu.double().cpu().numpy())
            kls.append(kl_divergence(out.mu.double(), out.logvar.double()).cpu().numpy())
            recs.append(reconstruction_nll(out, x, recon_kind).double().cpu().numpy())
    kl = np.concatenate(kls).astype(np.float64)
    recon = np.concatenate(recs).astype(np.float64)
    return {
        "lowpass_error": np.concatenate(lows).astype(np.float64),
        "mahalanobis": mahalanobis(np.concatenate(mus, axis=0), stats),
        "kl": kl,
        "recon": recon,
        "elbo": recon + kl,
    }
