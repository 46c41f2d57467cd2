"""The negative ELBO against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvae.config import LossConfig
from medvae.vae.losses import LossParts, kl_divergence, kl_weight, negative_elbo, reconstruction_nll
from medvae.vae.model import VAEOutput


def _out(logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> VAEOutput:
    return VAEOutput(torch.sigmoid(logits), logits, mu, logvar, mu)


def test_kl_known_values() -> None:
    # mu = 1, logvar = 0: 0.5 * (1 + 1 - 1 - 0) = 0.5 per dimension.
    kl = kl_divergence(torch.ones(3, 4), torch.zeros(3, 4))
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, torch.full((3,), 2.0))
    # The prior itself has zero divergence.
    torch.testing.assert_close(kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    # mu = 0, logvar = log 2: 0.5 * (2 - 1 - log 2) per dimension.
    kl = kl_divergence(torch.zeros(1, 3), torch.full((1, 3), math.log(2.0)))
    torch.testing.assert_close(kl, torch.tensor([1.5 * (1.0 - math.log(2.0))]))


def test_kl_upcasts_bf16() -> None:
    mu = torch.randn(4, 8).bfloat16()
    logvar = torch.randn(4, 8).bfloat16()
    kl = kl_divergence(mu, logvar)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, kl_divergence(mu.float(), logvar.float()))


def test_bce_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 4, 4, generator=g) * 3
    x = torch.rand(3, 1, 4, 4, generator=g)
    out = _out(logits, torch.zeros(3, 2), torch.zeros(3, 2))
    got = reconstruction_nll(out, x, "bce")
    assert got.shape == (3,)
    p = torch.sigmoid(logits)
    via_probs = F.binary_cross_entropy(p, x, reduction="none").sum(dim=(1, 2, 3))
    explicit = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(got, via_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, explicit, rtol=1e-5, atol=1e-5)


def test_bce_stable_for_saturated_logits() -> None:
    logits = torch.tensor([[[[200.0, -200.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    got = reconstruction_nll(_out(logits, torch.zeros(1, 1), torch.zeros(1, 1)), x, "bce")
    assert torch.isfinite(got).all() and got.item() < 1e-6


def test_mse_is_half_squared_error() -> None:
    logits = torch.tensor([[[[0.0, 0.0]]]])  # recon = 0.5 everywhere
    x = torch.tensor([[[[1.0, 0.0]]]])
    got = reconstruction_nll(_out(logits, torch.zeros(1, 1), torch.zeros(1, 1)), x, "mse")
    torch.testing.assert_close(got, torch.tensor([0.5 * (0.25 + 0.25)]))


def test_unknown_reconstruction_kind() -> None:
    out = _out(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="unknown reconstruction"):
        reconstruction_nll(out, torch.zeros(1, 1, 2, 2), "l1")  # type: ignore[arg-type]


def test_kl_weight_ramp() -> None:
    cfg = LossConfig(beta=2.0, kl_warmup_epochs=4)
    assert [kl_weight(e, cfg) for e in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert kl_weight(0, LossConfig(beta=0.7, kl_warmup_epochs=0)) == 0.7
    assert kl_weight(9, LossConfig(beta=0.7, kl_warmup_epochs=0)) == 0.7


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_negative_elbo_is_recon_plus_weighted_kl(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    out = _out(
        torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    )
    x = torch.rand(5, 1, 4, 4, generator=g)
    cfg = LossConfig(reconstruction=kind)  # type: ignore[arg-type]
    parts = negative_elbo(out, x, cfg, 0.3)
    assert isinstance(parts, LossParts)
    torch.testing.assert_close(parts.recon, reconstruction_nll(out, x, cfg.reconstruction).mean())
    torch.testing.assert_close(parts.kl, kl_divergence(out.mu, out.logvar).mean())
    torch.testing.assert_close(parts.loss, parts.recon + 0.3 * parts.kl)


def test_structural_term_is_zero_for_a_perfect_reconstruction_and_scales_with_pixels() -> None:
    from medvae.vae.losses import structural_loss

    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 16, 16, generator=g)
    logits = torch.logit(x.clamp(1e-4, 1 - 1e-4))
    z = torch.zeros(3, 2)
    same = structural_loss(_out(logits, z, z), x)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), atol=0.05, rtol=0)
    noisy = structural_loss(_out(torch.randn(3, 1, 16, 16, generator=g), z, z), x)
    # (1 - SSIM) of an unrelated image is near 1, times the 256 pixels.
    assert bool((noisy > 0.5 * 256).all()) and bool((noisy < 2.0 * 256).all())


def test_ssim_weight_adds_the_weighted_structural_term_to_recon() -> None:
    from medvae.vae.losses import structural_loss

    g = torch.Generator().manual_seed(3)
    out = _out(torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 3, generator=g), torch.zeros(4, 3))
    x = torch.rand(4, 1, 16, 16, generator=g)
    parts = negative_elbo(out, x, LossConfig(ssim_weight=0.25), 0.5)
    nll = reconstruction_nll(out, x, "bce").mean()
    torch.testing.assert_close(parts.recon, nll + 0.25 * structural_loss(out, x).mean())
    torch.testing.assert_close(parts.loss, parts.recon + 0.5 * parts.kl)


def test_ssim_matches_monai() -> None:
    from monai.losses import SSIMLoss

    from medvae.vae.losses import ssim_per_image

    g = torch.Generator().manual_seed(4)
    a = torch.rand(3, 1, 24, 20, generator=g)
    b = (a + 0.2 * torch.randn(3, 1, 24, 20, generator=g)).clamp(0, 1)
    monai_ssim = 1.0 - SSIMLoss(spatial_dims=2, data_range=1.0, reduction="none")(a, b).reshape(-1)
    torch.testing.assert_close(ssim_per_image(a, b), monai_ssim, atol=1e-5, rtol=0)
