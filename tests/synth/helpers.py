"""Tiny models and images shared by the synth tests."""

from __future__ import annotations

import numpy as np
import torch

from medvae.config import ModelConfig
from medvae.vae.model import ConvVAE

SIZE = 16


def tiny_vae(conditional: bool = False) -> ConvVAE:
    """A seeded 16x16 VAE (3 classes when conditional)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        channels=(8, 16),
        image_size=SIZE,
        latent_dim=4,
        conditional=conditional,
        num_classes=3 if conditional else 0,
    )
    return ConvVAE(cfg)


def noise_images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Uniform uint8 noise images (n, size, size)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)
