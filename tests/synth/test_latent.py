"""The latent Gaussian-mixture sampler that synthetic images start from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae.synth.latent import UNCONDITIONAL, GaussianMixtureSampler


def _codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(-3.0, 0.5, (200, 3))
    b = rng.normal(+3.0, 0.5, (120, 3))
    return np.concatenate([a, b]), np.array([0] * 200 + [1] * 120)


def test_each_label_samples_its_own_region_deterministically() -> None:
    mu, y = _codes()
    s = GaussianMixtureSampler.fit(mu, y, n_components=4, min_per_component=50)
    z0, z1 = s.sample(500, 0, seed=7), s.sample(500, 1, seed=7)
    assert z0.dtype == torch.float32 and z0.shape == (500, 3)
    assert float(z0.mean()) < -2.5 and float(z1.mean()) > 2.5
    assert torch.equal(z0, s.sample(500, 0, seed=7)) and not torch.equal(z0, s.sample(500, 0, seed=8))
    # Small label sets get fewer components (120 // 50 = 2), never an overfitted mixture.
    assert len(s.components[1][0]) == 2 and len(s.components[0][0]) == 4


def test_temperature_narrows_the_draws_and_round_trips() -> None:
    mu, _ = _codes()
    s = GaussianMixtureSampler.fit(mu, None, n_components=2)
    assert set(s.components) == {UNCONDITIONAL}
    wide, narrow = s.sample(2000, None, 0), s.with_temperature(0.25).sample(2000, None, 0)
    assert float(narrow[:, 0].std()) < float(wide[:, 0].std())
    meta, tensors = s.with_temperature(0.5).to_files()
    back = GaussianMixtureSampler.from_files(meta, tensors)
    assert back.temperature == 0.5 and torch.equal(
        back.sample(10, None, 3), s.with_temperature(0.5).sample(10, None, 3)
    )


def test_an_unknown_label_is_refused() -> None:
    mu, y = _codes()
    s = GaussianMixtureSampler.fit(mu, y)
    with pytest.raises(ValueError, match="label index 5"):
        s.sample(3, 5, 0)
