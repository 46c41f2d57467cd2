"""Heat maps that explain the deciding score, and their PNG rendering.

The flag comes from the calibrated score, so the map must show what drives *that* score.

- For the low-pass error (the default score) the map is the score itself, pixel by pixel: the squared
  difference of the blurred image and the blurred reconstruction inside the lung fields. It sums exactly
  to the score, so the map is the decision, not an approximation of it.
- For the latent scores an occlusion map does: each 8x8 patch of the image is replaced by the same patch
  of the mean normal image, and the drop in the score is the patch's heat. Measured on Kermany pneumonia
  (docs/quality.md), its mass falls in the lung fields at 1.39x the chance level and its total tracks the
  score (Spearman 0.92). An occlusion map of the low-pass error would not stay in the lungs: covering
  a shoulder moves the latent code and so the whole reconstruction.

The raw reconstruction error |x - recon| lit up rib edges, put more of its mass in the lungs of normals
than of pneumonia, and tracked the score at 0.56; it is kept only as a contrast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvae._io import safe_name, write_png
from medvae.engine.inference import (
    Device,
    ImageBatch,
    Labels,
    as_float_batch,
    eval_mode,
    iter_batches,
    model_device,
)
from medvae.vae.model import ConvVAE

PATCH, STRIDE = 8, 4


@torch.no_grad()
def occlusion_maps(
    model: ConvVAE,
    images: ImageBatch,
    cal: Any,
    *,
    labels: Labels = None,
    patch: int = PATCH,
    stride: int = STRIDE,
    batch_size: int = 256,
) -> np.ndarray:
    """How much each pixel's neighbourhood raises the calibrated score ``cal.score``.

    Every ``patch`` x ``patch`` window (step ``stride``) is filled with the mean normal image
    (``cal.mean_image``); a pixel's heat is the mean, over the windows covering it, of
    ``max(0, score(x) - score(x occluded))``: the part of the score that normal tissue there would remove.

    Args:
        model: the trained VAE.
        images: uint8 (N, H, W) (or float in [0, 1]).
        cal: the model's :class:`~medvae.anomaly.calibration.Calibration` (score, stats, mean image).
        labels: label indices for a conditional model (default: ``cal.default_label``).
        patch: the occluder's side in pixels.
        stride: the step between occluder positions.
        batch_size: occluded images per forward pass.

    Returns:
        Float32 array (N, H, W), in score units (0 where occluding never lowers the score).
    """
    from medvae.anomaly.stats import score_batch

    x = as_float_batch(images)
    n, _, h, w = x.shape
    fill = (
        torch.as_tensor(cal.mean_image, dtype=torch.float32)
        if cal.mean_image.size
        else torch.full((h, w), 0.5)
    )
    spots = [(r, c) for r in range(0, h - patch + 1, stride) for c in range(0, w - patch + 1, stride)]
    cover = torch.zeros(h, w)
    for r, c in spots:
        cover[r : r + patch, c : c + patch] += 1

    def score(batch: torch.Tensor, lab: Labels) -> np.ndarray:
        out = score_batch(
            model,
            batch,
            lab,
            stats=cal.stats,
            recon_kind=cal.recon_kind,
            roi=cal.roi,
            default_label=cal.default_label,
            batch_size=batch_size,
        )
        return np.asarray(out[cal.score])

    maps = np.zeros((n, h, w), dtype=np.float32)
    for i in range(n):
        lab = None if labels is None else np.repeat(np.asarray(labels)[i : i + 1], len(spots))
        base = score(x[i : i + 1], None if labels is None else np.asarray(labels)[i : i + 1])[0]
        occluded = x[i].repeat(len(spots), 1, 1, 1)
        for k, (r, c) in enumerate(spots):
            occluded[k, 0, r : r + patch, c : c + patch] = fill[r : r + patch, c : c + patch]
        drop = torch.as_tensor(np.maximum(0.0, base - score(occluded, lab)), dtype=torch.float32)
        heat = torch.zeros(h, w)
        for k, (r, c) in enumerate(spots):
            heat[r : r + patch, c : c + patch] += drop[k]
        maps[i] = (heat / cover.clamp_min(1)).numpy()
    return maps


@torch.no_grad()
def lowpass_maps(
    model: ConvVAE,
    images: ImageBatch,
    cal: Any,
    *,
    labels: Labels = None,
    whole_image: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    """The low-pass error per pixel (:func:`~medvae.anomaly.stats.lowpass_error_map`), one forward pass.

    Args:
        model: the trained VAE.
        images: uint8 (N, H, W) (or float in [0, 1]).
        cal: the model's calibration (its ``roi`` and ``default_label``).
        labels: label indices for a conditional model (default: ``cal.default_label``).
        whole_image: ignore ``cal.roi`` and map the error everywhere (to ask where the raw error lies).
        batch_size: images per forward pass.

    Returns:
        Float32 array (N, H, W); with ``whole_image`` False each map sums to the image's
        ``lowpass_error`` score.
    """
    from medvae.anomaly.stats import lowpass_error_map

    roi = None if whole_image else cal.roi
    return _pixel_maps(
        model,
        images,
        labels,
        cal.default_label,
        batch_size,
        None,
        lambda x, recon: lowpass_error_map(x.double(), recon.double(), roi),
    )


def score_maps(model: ConvVAE, images: ImageBatch, cal: Any, *, labels: Labels = None) -> np.ndarray:
    """The heat map of the calibrated score ``cal.score``: what ``medvae screen --heatmaps`` draws.

    The low-pass error is a sum over pixels, so its map is exact (:func:`lowpass_maps`); the latent
    scores have no such decomposition and get :func:`occlusion_maps`.

    Args:
        model: the trained VAE.
        images: uint8 (N, H, W) (or float in [0, 1]).
        cal: the model's :class:`~medvae.anomaly.calibration.Calibration`.
        labels: label indices for a conditional model.

    Returns:
        Float32 array (N, H, W) in score units.
    """
    if cal.score == "lowpass_error":
        return lowpass_maps(model, images, cal, labels=labels)
    return occlusion_maps(model, images, cal, labels=labels)


@torch.no_grad()
def reconstruction_error_maps(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    device: Device = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-pixel reconstruction error |x - recon| (posterior mean): a contrast; it does not explain flags.

    Args:
        model: the VAE.
        images: see :func:`as_float_batch`.
        labels: label indices for a conditional model.
        device: where to compute; None: the model's device.
        default_label: the label for images without one (conditional models only).
        batch_size: images per forward pass.

    Returns:
        Float32 array (N, H, W) in [0, 1].
    """
    def abs_error(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return (x - recon).abs().squeeze(1)

    return _pixel_maps(model, images, labels, default_label, batch_size, device, abs_error)


def _pixel_maps(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels,
    default_label: int | None,
    batch_size: int,
    device: Device,
    per_pixel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """``per_pixel(x, recon)`` (N, H, W) over batches of eval-mode reconstructions, as float32 numpy."""
    dev = model_device(model, device)
    maps: list[np.ndarray] = []
    with eval_mode(model):
        for x, y in iter_batches(model, images, labels, default_label, batch_size, dev):
            maps.append(per_pixel(x, model(x, y).recon).float().cpu().numpy())
    if not maps:
        size = model.cfg.image_size
        return np.zeros((0, size, size), dtype=np.float32)
    return np.concatenate(maps, axis=0).astype(np.float32)


# Anchor colours of matplotlib's "inferno" at 0, 1/8, ..., 1 (matplotlib is not a dependency); linear
# interpolation between them is close enough for a perceptually ordered dark-to-bright heat scale.
_INFERNO_ANCHORS = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def inferno_lut() -> np.ndarray:
    """A 256-entry uint8 RGB lookup table approximating matplotlib's "inferno"."""
    pos = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    t = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(t, pos, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.asarray(np.round(lut), dtype=np.uint8)


def _overlay(grey: np.ndarray, heat: np.ndarray, top: float, lut: np.ndarray) -> np.ndarray:
    """The image in grey with the heat blended over it, opaque and bright where the heat is largest.

    The colours skip the darkest quarter of inferno (it would darken the scan, not mark it), and the
    opacity grows with the square root of the heat, so moderate heat stays visible beside the largest.
    """
    t = np.clip(heat / top, 0.0, 1.0)
    rgb = np.repeat(grey[:, :, None].astype(np.float64), 3, axis=2)
    colour = lut[np.round(64 + t * 191).astype(np.uint8)].astype(np.float64)
    alpha = (0.85 * np.sqrt(t))[:, :, None]
    return np.asarray(np.round(rgb * (1 - alpha) + colour * alpha), dtype=np.uint8)


def heatmap_tile(image: np.ndarray, heat: np.ndarray, caption: str, top: float, scale: int = 4) -> np.ndarray:
    """Image | overlay | colour bar, with the caption strip below."""
    from PIL import Image, ImageDraw

    lut = inferno_lut()
    h = image.shape[0] * scale
    left = np.repeat(np.repeat(np.repeat(image[:, :, None], 3, axis=2), scale, 0), scale, 1)
    right = np.repeat(np.repeat(_overlay(image, heat, top, lut), scale, 0), scale, 1)
    bar = np.repeat(lut[np.linspace(255, 64, h).astype(np.uint8)][:, None, :], 12, axis=1)
    lines = caption.split("\n") if caption else []
    canvas = Image.new("RGB", (2 * h + 70, h + 14 * len(lines) + 6), "black")
    canvas.paste(Image.fromarray(left), (0, 0))
    canvas.paste(Image.fromarray(right), (h + 4, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (2 * h + 10, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2 * h + 25, 0), f"{top:.3g}", fill="white")
    draw.text((2 * h + 25, h - 11), "0", fill="white")
    for k, line in enumerate(lines):
        draw.text((2, h + 3 + 14 * k), line, fill="white")
    return np.asarray(canvas)


def save_heatmap_pngs(
    images: np.ndarray,
    maps: np.ndarray,
    out_dir: Path,
    names: Sequence[str],
    *,
    captions: Sequence[str] | None = None,
    vmax: float | None = None,
    scale: int = 4,
) -> list[Path]:
    """Write one PNG per image: the scan, the heat overlaid on it, a colour bar, and a caption.

    All maps share one colour scale (``vmax``, shown on the bar), so a brighter map means more of the
    score than a darker one in another file; per-image scaling would make every map look equally alarming.

    Args:
        images: uint8 (N, H, W).
        maps: heat maps (N, H, W), e.g. from :func:`occlusion_maps`.
        out_dir: the folder to write into (created if needed).
        names: one file stem per image; sanitised and de-duplicated, so files land directly in ``out_dir``.
        captions: one text per image (lines separated by newlines), e.g. score, percentile and flag.
        vmax: the heat mapped to the brightest colour; None: the largest value in ``maps``.
        scale: nearest-neighbour upscaling factor (64 px is small on screen).

    Returns:
        The written paths, in input order.

    Raises:
        ValueError: for mismatched shapes, name or caption counts.
    """
    images, maps = np.asarray(images), np.asarray(maps, dtype=np.float64)
    if images.dtype != np.uint8 or images.ndim != 3 or maps.shape != images.shape:
        raise ValueError(
            f"need uint8 images (N, H, W) and maps of the same shape, got {images.shape}, {maps.shape}"
        )
    if len(names) != len(images) or (captions is not None and len(captions) != len(images)):
        raise ValueError(f"need one name (and caption) per image: {len(images)} images, {len(names)} names")
    if scale < 1:
        raise ValueError("scale must be >= 1")
    top = float(maps.max()) if vmax is None and maps.size else float(vmax or 0.0)
    top = top if top > 0 else 1.0
    used: set[str] = set()
    paths: list[Path] = []
    for i in range(len(images)):
        stem = safe_name(names[i], f"image_{i:05d}")
        if stem.lower() in used:  # two names can sanitise to one; never overwrite an earlier picture
            stem = f"{stem}_{i:05d}"
        used.add(stem.lower())
        tile = heatmap_tile(images[i], maps[i], captions[i] if captions else "", top, scale)
        paths.append(write_png(tile, Path(out_dir) / f"{stem}.png"))
    return paths
