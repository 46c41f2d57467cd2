"""The ConvVAE: unconditional layout unchanged, and a label the conditional decoder cannot ignore."""

from __future__ import annotations

import torch

from medvae.config import ModelConfig
from medvae.vae.model import ConditionalBatchNorm2d, ConvVAE

SMALL = {"channels": (8, 16), "latent_dim": 4, "image_size": 16}


def test_an_unconditional_model_keeps_its_state_dict_layout() -> None:
    # Model directories written before conditioning existed must keep loading strictly.
    keys = sorted(ConvVAE(ModelConfig(**SMALL)).state_dict())
    assert "decoder.2.running_mean" in keys and "decoder.2.weight" in keys
    assert not any("gamma" in k or "beta" in k for k in keys)
    assert ConvVAE(ModelConfig(**SMALL)).encoder[0].in_channels == 1


def test_the_label_reaches_every_decoder_block_and_the_encoder() -> None:
    model = ConvVAE(ModelConfig(**SMALL, conditional=True, num_classes=2))
    cbns = [m for m in model.decoder if isinstance(m, ConditionalBatchNorm2d)]
    assert len(cbns) == len(SMALL["channels"]) - 1
    assert model.encoder[0].in_channels == 3  # the image plus one plane per class
    with torch.no_grad():
        for m in cbns:  # as if trained: the classes have their own scale and shift
            m.gamma.weight[1].mul_(3.0)
            m.beta.weight[1].add_(1.0)
    model.eval()
    z = torch.randn(4, 4)
    a = model.decode(z, torch.zeros(4, dtype=torch.long))
    b = model.decode(z, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().mean() > 0.05
    x = torch.rand(4, 1, 16, 16)
    mu0, _ = model.encode(x, torch.zeros(4, dtype=torch.long))
    mu1, _ = model.encode(x, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(mu0, mu1)


def test_concat_conditioning_is_still_available() -> None:
    model = ConvVAE(
        ModelConfig(
            **SMALL, conditional=True, num_classes=2, conditioning="concat", encoder_label_planes=False
        )
    )
    assert not any(isinstance(m, ConditionalBatchNorm2d) for m in model.modules())
    assert model.encoder[0].in_channels == 1
    out = model(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))
    assert out.recon.shape == (2, 1, 16, 16)


def test_logvar_is_clamped() -> None:
    model = ConvVAE(ModelConfig(**SMALL))
    with torch.no_grad():
        model.fc_logvar.bias.fill_(500.0)
    _, logvar = model.encode(torch.rand(2, 1, 16, 16))
    assert float(logvar.max()) <= 20.0
