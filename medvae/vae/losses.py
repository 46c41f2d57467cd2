"""The negative ELBO and its parts, kept apart from the model."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from medvae.config import LossConfig
from medvae.vae.model import VAEOutput


class LossParts(NamedTuple):
    """One batch's loss and its parts.

    Each is the mean over images of a per-image sum (over pixels for ``recon``, over latent dimensions
    for ``kl``), so values compare across batch sizes and ``loss == recon + kl_weight * kl``.
    """

    loss: Tensor
    recon: Tensor
    kl: Tensor


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) for a diagonal Gaussian posterior, per image.

    Args:
        mu: posterior means, shape (N, latent).
        logvar: posterior log-variances, shape (N, latent).

    Returns:
        The KL divergence of each image's posterior from the prior, shape (N,), in float32 or wider.
    """
    # Upcast: under bf16 autocast the heads emit bf16, and exp()/sums in bf16 lose several digits.
    mu = mu.float() if mu.dtype in (torch.float16, torch.bfloat16) else mu
    logvar = logvar.float() if logvar.dtype in (torch.float16, torch.bfloat16) else logvar
    return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)


def reconstruction_nll(out: VAEOutput, x: Tensor, kind: Literal["bce", "mse"]) -> Tensor:
    """Negative log-likelihood of the images under the decoder, per image.

    Args:
        out: the model's forward output.
        x: the target images in [0, 1], shape (N, 1, H, W).
        kind: ``"bce"`` for a Bernoulli (continuous-relaxed) likelihood on the logits, or ``"mse"`` for a
            unit-variance Gaussian, i.e. ``0.5 * sum((recon - x)^2)`` up to an additive constant.

    Returns:
        The per-image negative log-likelihood summed over pixels, shape (N,), in float32 or wider.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    n = x.shape[0]
    target = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if kind == "bce":
        # On logits, not on sigmoid output: log-sum-exp form is stable for saturated pixels and is the
        # variant autocast allows (F.binary_cross_entropy refuses to run under autocast).
        logits = out.logits.float() if out.logits.dtype in (torch.float16, torch.bfloat16) else out.logits
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return bce.reshape(n, -1).sum(dim=1)
    if kind == "mse":
        recon = out.recon.float() if out.recon.dtype in (torch.float16, torch.bfloat16) else out.recon
        return 0.5 * (recon - target).pow(2).reshape(n, -1).sum(dim=1)
    raise ValueError(f"unknown reconstruction likelihood {kind!r}; expected 'bce' or 'mse'")


def kl_weight(epoch: int, cfg: LossConfig) -> float:
    """The KL weight for a (0-based) epoch: a linear warm-up from 0 to ``beta``.

    Epoch 0 has weight 0 and epoch ``kl_warmup_epochs`` (and later) has ``beta``; with no warm-up the
    weight is ``beta`` from the start.

    Args:
        epoch: the 0-based training epoch.
        cfg: the loss configuration.

    Returns:
        The weight that multiplies the KL term of the negative ELBO.
    """
    if cfg.kl_warmup_epochs <= 0:
        return float(cfg.beta)
    return float(cfg.beta) * min(1.0, max(0, epoch) / cfg.kl_warmup_epochs)


_SSIM_WINDOW, _SSIM_SIGMA, _SSIM_K1, _SSIM_K2 = 11, 1.5, 0.01, 0.03


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    r = torch.arange(_SSIM_WINDOW, dtype=dtype, device=device) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_per_image(a: Tensor, b: Tensor) -> Tensor:
    """The mean SSIM (Wang et al. 2004) of each pair of single-channel images in [0, 1], shape (N,).

    Gaussian 11×11 window of σ 1.5 over valid positions, K1 0.01, K2 0.03: the definition of MONAI's
    ``SSIMMetric``, which the tests hold it to. It is written out in torch so that training never
    imports MONAI (the GPU image has none).
    """
    w = _gaussian_window(a.dtype, a.device)
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim.flatten(1).mean(dim=1)


def structural_loss(out: VAEOutput, x: Tensor) -> Tensor:
    """``(1 - SSIM) * pixels`` of each reconstruction against its image, shape (N,), float32.

    Scaled by the pixel count because the likelihood is a sum over pixels: a weight of 1 puts the two
    on one scale. Images must be at least 11 px on a side (the SSIM window).
    """
    return (1.0 - ssim_per_image(out.recon.float(), x.float())) * float(x[0].numel())


def negative_elbo(out: VAEOutput, x: Tensor, cfg: LossConfig, kl_w: float | Tensor) -> LossParts:
    """The (β-weighted) negative ELBO of a batch and its parts.

    Args:
        out: the model's forward output.
        x: the target images in [0, 1], shape (N, 1, H, W).
        cfg: the loss configuration (its ``reconstruction`` picks the likelihood).
        kl_w: the KL weight, e.g. from :func:`kl_weight`; a 0-dim tensor also works.

    Returns:
        ``LossParts(loss, recon, kl)``: batch means of per-image sums, with ``loss = recon + kl_w * kl``;
        ``recon`` includes the structural term when ``cfg.ssim_weight`` is set.
    """
    recon = reconstruction_nll(out, x, cfg.reconstruction).mean()
    # None (unresolved, see TrainConfig.resolved_loss) is the plain ELBO. The term is part of the
    # reconstruction term, so that selection and the logs see the loss that was trained on.
    if cfg.ssim_weight:
        recon = recon + cfg.ssim_weight * structural_loss(out, x).mean()
    kl = kl_divergence(out.mu, out.logvar).mean()
    return LossParts(recon + kl_w * kl, recon, kl)
