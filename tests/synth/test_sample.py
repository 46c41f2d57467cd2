"""Sampling synthetic images from the prior."""

from __future__ import annotations

import numpy as np
import pytest

from medvae.synth.sample import sample_images
from tests.synth.helpers import SIZE, tiny_vae


def test_sample_images_reproducible_from_seed() -> None:
    model = tiny_vae()
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
    model = tiny_vae(conditional=True)
    with pytest.raises(ValueError, match="label_index"):
        sample_images(model, 2, seed=0)
    a = sample_images(model, 4, seed=0, label_index=2)
    assert not np.array_equal(a, sample_images(model, 4, seed=0, label_index=0))
