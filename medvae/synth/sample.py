"""Synthetic images decoded from latent draws."""

from __future__ import annotations

import numpy as np
import torch

from medvae.engine.inference import Device, eval_mode, model_device, resolve_labels, to_uint8
from medvae.synth.latent import GaussianMixtureSampler
from medvae.vae.model import ConvVAE


@torch.no_grad()
def sample_images(
    model: ConvVAE,
    n: int,
    *,
    label_index: int | None = None,
    seed: int,
    device: Device = None,
    batch_size: int = 512,
    sampler: GaussianMixtureSampler | None = None,
) -> np.ndarray:
    """Decode ``n`` latent draws into uint8 images: from ``sampler`` when given, else the prior N(0, I).

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
        sampler: a density fitted on training posterior means (:mod:`medvae.synth.latent`).

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
    if sampler is not None:
        z_all = sampler.sample(n, label_index, seed)
    else:
        z_all = torch.randn(
            n, model.latent_dim, generator=torch.Generator(device="cpu").manual_seed(int(seed))
        )
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
