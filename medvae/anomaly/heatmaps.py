"""Per-pixel anomaly heat maps and their PNG rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvae._io import safe_name, write_png
from medvae.engine.inference import Device, ImageBatch, Labels, eval_mode, iter_batches, model_device
from medvae.vae.model import ConvVAE


@torch.no_grad()
def heatmaps(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels = None,
    device: Device = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-pixel reconstruction error |x - recon| with recon decoded from the posterior mean.

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
    dev = model_device(model, device)
    maps: list[np.ndarray] = []
    with eval_mode(model):
        for x, y in iter_batches(model, images, labels, default_label, batch_size, dev):
            out = model(x, y)
            maps.append((x - out.recon).abs().squeeze(1).float().cpu().numpy())
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


def save_heatmap_pngs(
    images: np.ndarray,
    maps: np.ndarray,
    out_dir: Path,
    names: list[str],
    *,
    vmax: float | None = None,
    scale: int = 4,
    gap: int = 2,
) -> list[Path]:
    """Write one PNG per image: the image (grey) and its heat map (inferno) side by side.

    All maps share one colour scale (``vmax``), so a brighter map means a larger error than a darker
    one in another file; per-image scaling would make every map look equally alarming.

    Args:
        images: uint8 (N, H, W).
        maps: heat maps (N, H, W), e.g. from :func:`heatmaps`.
        out_dir: the folder to write into (created if needed).
        names: one name per image; sanitised to [A-Za-z0-9._-] and de-duplicated, so files always
            land directly inside ``out_dir``.
        vmax: the error mapped to the brightest colour; None: the largest value in ``maps``.
        scale: nearest-neighbour upscaling factor (64 px is small on screen).
        gap: black pixels between the two panels (before scaling).

    Returns:
        The written paths, in input order.

    Raises:
        ValueError: for mismatched shapes or name counts.
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float64)
    if images.dtype != np.uint8 or images.ndim != 3 or maps.shape != images.shape:
        raise ValueError(
            f"need uint8 images (N, H, W) and maps of the same shape, got {images.shape}, {maps.shape}"
        )
    if len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if scale < 1 or gap < 0:
        raise ValueError("scale must be >= 1 and gap >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    top = float(maps.max()) if vmax is None and maps.size else float(vmax or 0.0)
    top = top if top > 0 else 1.0
    lut = inferno_lut()
    n, h, _ = images.shape
    used: set[str] = set()
    paths: list[Path] = []
    for i in range(n):
        stem = safe_name(names[i], f"image_{i:05d}")
        if stem.lower() in used:  # two names can sanitise to one; never overwrite an earlier picture
            stem = f"{stem}_{i:05d}"
        used.add(stem.lower())
        path = out_dir / f"{stem}.png"
        # Belt and braces: the sanitised stem cannot contain a separator, but check the final location.
        if path.resolve().parent != root:
            raise ValueError(f"refusing to write outside {out_dir}: {names[i]!r}")
        grey = np.repeat(images[i][:, :, None], 3, axis=2)
        idx = np.clip(np.round(maps[i] / top * 255.0), 0, 255).astype(np.uint8)
        panel = np.concatenate([grey, np.zeros((h, gap, 3), np.uint8), lut[idx]], axis=1)
        if scale > 1:
            panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
        paths.append(write_png(panel, path))
    return paths
