"""Picture grids of images, reconstructions, samples and latent interpolations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvae._io import write_png
from medvae.engine.inference import (
    Device,
    ImageBatch,
    Labels,
    as_float_batch,
    eval_mode,
    model_device,
    resolve_labels,
    to_uint8,
)
from medvae.vae.model import ConvVAE


def _grid(images: np.ndarray, nrow: int, pad: int, pad_value: int) -> np.ndarray:
    n, h, w = images.shape
    cols = min(n, nrow)
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = images[k]
    return grid


def save_grid(images: np.ndarray, path: Path, nrow: int = 8, pad: int = 2, pad_value: int = 0) -> Path:
    """Write uint8 images (n, H, W) as one PNG grid, ``nrow`` images per row, atomically.

    The picture is ``min(n, nrow) * (W + pad) + pad`` wide and ``ceil(n / nrow) * (H + pad) + pad`` high.

    Args:
        images: uint8 (n, H, W), n >= 1.
        path: the PNG to write (its folder is created if needed).
        nrow: images per row.
        pad: pixels between and around images.
        pad_value: grey level of the padding.

    Returns:
        ``path``.

    Raises:
        ValueError: for an empty, non-uint8 or non-3-D array, or nrow < 1 / pad < 0.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 array (n, H, W), got {images.dtype} {images.shape}")
    if nrow < 1 or pad < 0:
        raise ValueError("nrow must be >= 1 and pad >= 0")
    return write_png(_grid(images, nrow, pad, pad_value), Path(path))


@torch.no_grad()
def reconstruction_grid(
    model: ConvVAE,
    images: ImageBatch,
    path: Path,
    labels: Labels = None,
    n: int = 16,
    *,
    nrow: int = 8,
    default_label: int | None = None,
    device: Device = None,
) -> Path:
    """A PNG of the first ``n`` images and their reconstructions from the posterior mean.

    Rows alternate: up to ``nrow`` originals, then their reconstructions directly below.

    Args:
        model: the VAE.
        images: see :func:`medvae.engine.inference.as_float_batch`.
        path: the PNG to write.
        labels: label indices for a conditional model.
        n: how many images to show.
        nrow: images per row.
        default_label: the label for images without one (conditional models only).
        device: where to compute; None: the model's device.

    Returns:
        ``path``.
    """
    k = min(n, len(images))
    if k < 1:
        raise ValueError("reconstruction_grid needs at least one image")
    dev = model_device(model, device)
    x = as_float_batch(images[:k]).to(dev)
    lab = None if labels is None else labels[:k]
    y = resolve_labels(model, lab, k, default_label)
    with eval_mode(model):
        recon = model(x, None if y is None else y.to(dev)).recon
    orig, rec = to_uint8(x), to_uint8(recon)
    cols = min(k, nrow)
    blank = np.zeros((cols, *orig.shape[1:]), dtype=np.uint8)
    tiles: list[np.ndarray] = []
    for start in range(0, k, cols):
        # Pad a short last row with blanks so each reconstruction sits right below its original.
        for part in (orig[start : start + cols], rec[start : start + cols]):
            tiles.append(np.concatenate([part, blank[: cols - len(part)]], axis=0))
    return save_grid(np.concatenate(tiles, axis=0), path, nrow=cols)


@torch.no_grad()
def interpolation_grid(
    model: ConvVAE,
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
    steps: int = 8,
    label: int | None = None,
    *,
    device: Device = None,
) -> Path:
    """A PNG walking the latent space between pairs of images, one row per pair.

    Each row shows image a, then ``steps`` decodings of (1 - t)·μ(a) + t·μ(b) for t evenly spaced in
    [0, 1] (so the ends are the reconstructions of a and b), then image b.

    Args:
        model: the VAE.
        a: uint8 (H, W) or several (k, H, W).
        b: the same shape as ``a``.
        path: the PNG to write.
        steps: decoded images per row, >= 2.
        label: the label index for a conditional model (the same for every image).
        device: where to compute; None: the model's device.

    Returns:
        ``path``.
    """
    xa, xb = as_float_batch(a), as_float_batch(b)
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    if steps < 2:
        raise ValueError("steps must be >= 2")
    k = xa.shape[0]
    dev = model_device(model, device)
    xa, xb = xa.to(dev), xb.to(dev)
    y = resolve_labels(model, None, k, label)
    y = None if y is None else y.to(dev)
    t = torch.linspace(0.0, 1.0, steps, device=dev)
    with eval_mode(model):
        mu_a, _ = model.encode(xa, y)
        mu_b, _ = model.encode(xb, y)
        # (k, steps, d): every pair walks the same t grid.
        z = mu_a[:, None, :] + t[None, :, None] * (mu_b - mu_a)[:, None, :]
        y_rep = None if y is None else y.repeat_interleave(steps)
        dec = model.decode(z.reshape(k * steps, -1), y_rep)
    walk = to_uint8(dec).reshape(k, steps, *dec.shape[-2:])
    rows = np.concatenate([to_uint8(xa)[:, None], walk, to_uint8(xb)[:, None]], axis=1)
    return save_grid(rows.reshape(-1, *rows.shape[2:]), path, nrow=steps + 2)
