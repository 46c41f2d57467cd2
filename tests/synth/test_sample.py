"""Sampling synthetic images from the prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae.config import ModelConfig
from medvae.synth.sample import sample_images
from medvae.vae.model import ConvVAE

SIZE = 16


def _model(conditional: bool = False) -> ConvVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(
        channels=(8, 16),
        image_size=SIZE,
        latent_dim=4,
        conditional=conditional,
        num_classes=3 if conditional else 0,
    )
    return ConvVAE(cfg)


def _images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def test_sample_images_reproducible_from_seed() -> None:
    model = _model()
    model.train()
    a = sample_images(model, 10, seed=7)
    assert model.training, "sample_images must restore train mode"
    assert a.shape == (10, SIZE, SIZE) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, sample_images(model, 10, seed=7, batch_size=3))
    assert not np.array_equal(a, sample_images(model, 10, seed=8))
    assert sample_images(model, 0, seed=1).shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match="unconditional"):
        sample_images(model, 2, seed=0, label_index=1)


def test_sample_images_conditional() -> None:
    model = _model(conditional=True)
    with pytest.raises(ValueError, match="label_index"):
        sample_images(model, 2, seed=0)
    a = sample_images(model, 4, seed=0, label_index=2)
    assert not np.array_equal(a, sample_images(model, 4, seed=0, label_index=0))
