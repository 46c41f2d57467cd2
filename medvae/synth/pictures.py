"""Picture grids: synthetic samples (safe to share) apart from pictures of real images (opt-in).

Two kinds of picture live here, and their names say which:

* :func:`sample_grid` and :func:`label_sample_grids` decode prior draws only. No real scan is shown, so
  they may be saved next to a model and put into reports.
* :func:`real_reconstruction_grid` and :func:`real_interpolation_grid` show *real training images* (and
  near copies of them), burned-in text included. They are opt-in diagnostics: never write them into a
  model directory or anything shared beyond the people allowed to see the training data.

Every grid is laid out by :func:`torchvision.utils.make_grid` and written with
:func:`medvae._io.write_png`: deterministic bytes (same pixels, same PNG), written atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from medvae.synth.sample import sample_images
from medvae.vae.model import ConvVAE

CAPTION_PAD = 4  # pixels around caption text


def grid_array(images: np.ndarray, nrow: int = 8, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Lay uint8 images (n, H, W) out as one uint8 (H', W') grid with :func:`torchvision.utils.make_grid`.

    The grid is ``min(n, nrow) * (W + pad) + pad`` wide and ``ceil(n / nrow) * (H + pad) + pad`` high.

    Raises:
        ValueError: for an empty, non-uint8 or non-3-D array, nrow < 1, pad < 0 or pad_value outside 0..255.
    """
    from torchvision.utils import make_grid

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 array (n, H, W), got {images.dtype} {images.shape}")
    if nrow < 1 or pad < 0 or not 0 <= pad_value <= 255:
        raise ValueError("nrow must be >= 1, pad >= 0 and pad_value in 0..255")
    t = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    # make_grid repeats one channel into three; the channels are equal, so keep the first (greyscale).
    return make_grid(t, nrow=nrow, padding=pad, pad_value=pad_value)[0].numpy()


def save_grid(
    images: np.ndarray,
    path: Path,
    nrow: int = 8,
    pad: int = 2,
    pad_value: int = 0,
    *,
    caption: str | None = None,
) -> Path:
    """Write uint8 images (n, H, W) as one greyscale PNG grid (:func:`grid_array`), atomically.

    Args:
        images: uint8 (n, H, W), n >= 1.
        path: the PNG to write (its folder is created if needed).
        nrow: images per row.
        pad: pixels between and around images.
        pad_value: grey level of the padding.
        caption: text rendered in a strip above the grid (:func:`with_caption`); None for no strip.

    Returns:
        ``path``.
    """
    grid = grid_array(images, nrow, pad, pad_value)
    return write_png(grid if caption is None else with_caption(grid, caption), Path(path))


def _wrap(text: str, width: int, measure: Callable[[str], float]) -> list[str]:
    # Greedy word wrap by rendered width; a single over-long word stays on its own line (cut by the edge).
    lines: list[str] = []
    for word in text.split(" "):
        cand = f"{lines[-1]} {word}" if lines else word
        if lines and measure(cand) <= width:
            lines[-1] = cand
        else:
            lines.append(word)
    return lines


def with_caption(grid: np.ndarray, caption: str, *, fg: int = 255, bg: int = 0) -> np.ndarray:
    """A copy of a uint8 (H, W) picture with a caption strip above it (Pillow's default font).

    The text is wrapped to the picture's width, so narrow grids get several lines rather than a cut.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    width = grid.shape[1]
    lines = _wrap(" ".join(caption.split()), width - 2 * CAPTION_PAD, probe.textlength)
    line_h = int(font.getbbox("Ag")[3]) + 2
    strip = Image.new("L", (width, len(lines) * line_h + 2 * CAPTION_PAD), bg)
    draw = ImageDraw.Draw(strip)
    for k, line in enumerate(lines):
        draw.text((CAPTION_PAD, CAPTION_PAD + k * line_h), line, fill=fg, font=font)
    return np.concatenate([np.asarray(strip, dtype=np.uint8), grid], axis=0)


def sample_grid(
    model: ConvVAE,
    path: Path,
    n: int = 32,
    *,
    seed: int,
    label_index: int | None = None,
    caption: str | None = None,
    nrow: int = 8,
    device: Device = None,
) -> Path:
    """A PNG of ``n`` synthetic images decoded from prior draws: no real image, safe to share.

    Args:
        model: the VAE.
        path: the PNG to write.
        n: how many samples (>= 1).
        seed: the sampling seed (:func:`medvae.synth.sample.sample_images`).
        label_index: the class to sample for a conditional model; None for an unconditional one.
        caption: text rendered in a strip above the grid; None for no strip.
        nrow: images per row.
        device: where to decode.

    Returns:
        ``path``.
    """
    if n < 1:
        raise ValueError("sample_grid needs n >= 1")
    images = sample_images(model, n, label_index=label_index, seed=seed, device=device)
    return save_grid(images, path, nrow, caption=caption)


def label_sample_grids(
    model: ConvVAE,
    out_dir: Path,
    label_names: Sequence[str],
    *,
    model_hash: str,
    seed: int,
    n: int = 16,
    nrow: int = 8,
    device: Device = None,
) -> dict[str, Path]:
    """One captioned synthetic grid per label of a conditional VAE: ``samples_<label>.png``.

    Each caption names the label, the model hash prefix and the seed, so a picture found on its own
    still says what made it. Label k is sampled with seed ``seed * 1000 + k``, so labels do not share
    latent draws (a caller with its own per-label seeds calls :func:`sample_grid` per label instead).

    Args:
        model: a conditional VAE whose label indices follow ``label_names``.
        out_dir: the folder to write into.
        label_names: the model's label names, by index.
        model_hash: the model's hash (its first 12 characters are shown).
        seed: the base seed.
        n: samples per label.
        nrow: images per row.
        device: where to decode.

    Returns:
        Label name -> written path.

    Raises:
        ValueError: for an unconditional model or a label count that does not match the model.
    """
    from medvae._io import safe_name

    if not model.n_cond or len(label_names) != model.n_cond:
        raise ValueError(f"need a conditional VAE with {len(label_names)} classes, got n_cond={model.n_cond}")
    paths: dict[str, Path] = {}
    for k, name in enumerate(label_names):
        s = seed * 1000 + k
        path = Path(out_dir) / f"samples_{safe_name(name, f'label{k}')}.png"
        caption = f"synthetic · label {name} · model {model_hash[:12]} · seed {s}"
        paths[name] = sample_grid(
            model, path, n, seed=s, label_index=k, caption=caption, nrow=nrow, device=device
        )
    return paths


@torch.no_grad()
def real_reconstruction_grid(
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
    """Opt-in, shows real images: a PNG of the first ``n`` images and their reconstructions.

    The originals are real scans and the reconstructions (posterior mean) are close to them: keep the
    picture where the training data may be seen, never in a model directory or a shared report.

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
        raise ValueError("real_reconstruction_grid needs at least one image")
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
def real_interpolation_grid(
    model: ConvVAE,
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
    steps: int = 8,
    label: int | None = None,
    *,
    device: Device = None,
) -> Path:
    """Opt-in, shows real images: a PNG walking the latent space between pairs of images.

    Both ends of each row are real scans; keep the picture where the training data may be seen.

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


# Deprecated names kept only until medvae.jobs and medvae.eval.study call the real_* names; remove then.
reconstruction_grid = real_reconstruction_grid
interpolation_grid = real_interpolation_grid
