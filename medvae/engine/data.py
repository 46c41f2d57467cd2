"""Training data on the device: input checks, the validation hold-out, seeding and batch preparation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from medvae.config import TrainConfig

ArrayLike = np.ndarray | Tensor


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) global random generators.

    Args:
        seed: any integer.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's shuffle, derived from (seed, epoch) only.

    An epoch's permutation does not depend on how many epochs ran in this process or on how many
    processes share it, which is what lets a resumed run, and every rank, draw the same order.
    """
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % 2**63)
    return g


def rank_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A seed derived from (seed, epoch, rank, stream) only.

    Every epoch reseeds this rank's reparameterisation noise (``stream`` 0, torch's global generator)
    and its augmentation (``stream`` 1): ranks do not repeat each other's draws, and a resumed run at
    the same world size draws exactly what the uninterrupted one did, with no RNG state to save.
    """
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + stream * 15_485_863 + 31) % 2**63


@dataclass
class TrainData:
    """Validated uint8 images (N, 1, H, W) and int64 labels (or None) for training and validation."""

    x_train: Tensor
    y_train: Tensor | None
    x_val: Tensor
    y_val: Tensor | None

    @property
    def n_train(self) -> int:
        """The number of training images."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """The number of validation images."""
        return int(self.x_val.shape[0])


def as_images(images: ArrayLike, size: int, what: str) -> Tensor:
    """uint8 images as a contiguous (N, 1, size, size) tensor.

    Raises:
        TypeError: when they are not uint8 (the store's format).
        ValueError: for any other shape.
    """
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (as stored), got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1 or t.shape[2] != size or t.shape[3] != size:
        raise ValueError(
            f"{what} must be shaped (N, {size}, {size}) or (N, 1, {size}, {size}), got {tuple(t.shape)}"
        )
    return t.contiguous()


def as_labels(labels: ArrayLike | None, n: int, num_classes: int, what: str) -> Tensor:
    """``n`` integer class indices in [0, num_classes) as an int64 tensor.

    Raises:
        ValueError: when they are missing, not integers, of another length or out of range.
    """
    if labels is None:
        raise ValueError(f"a conditional VAE (model.conditional) needs {what}; got None")
    t = torch.as_tensor(labels)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{what} must be {n} integer class indices, got dtype {t.dtype}, shape {tuple(t.shape)}"
        )
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"{what} must lie in [0, model.num_classes) = [0, {num_classes}); got range "
            f"[{int(t.min())}, {int(t.max())}]: set model.num_classes to more than the largest label"
        )
    return t


def _holdout(x: Tensor, y: Tensor | None, fraction: float, seed: int) -> TrainData:
    # A seeded random hold-out, for callers without a (patient-grouped) validation split of their own.
    n = x.shape[0]
    n_val = max(1, round(n * fraction))
    if n - n_val < 2:
        raise ValueError(
            f"{n} images leave fewer than 2 for training after holding out {n_val} for validation"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return TrainData(x[train], _pick(y, train), x[val], _pick(y, val))


def _pick(t: Tensor | None, idx: Tensor) -> Tensor | None:
    return t[idx] if t is not None else None


def prepare_data(
    images: ArrayLike,
    labels: ArrayLike | None,
    cfg: TrainConfig,
    val_images: ArrayLike | None = None,
    val_labels: ArrayLike | None = None,
) -> TrainData:
    """Check the inputs of :func:`medvae.engine.trainer.train_vae` and split off validation if needed.

    Labels are only read for a conditional VAE. Without ``val_images`` a seeded ``cfg.val_fraction``
    of ``images`` is held out (not patient-grouped).

    Returns:
        Host tensors of the training and validation images and labels.

    Raises:
        TypeError, ValueError: for inconsistent images or labels, or too few images.
    """
    size, conditional, k = cfg.model.image_size, cfg.model.conditional, cfg.model.num_classes
    x = as_images(images, size, "images")
    y = as_labels(labels, x.shape[0], k, "labels") if conditional else None
    if val_images is None:
        data = _holdout(x, y, cfg.val_fraction, cfg.seed)
    else:
        xv = as_images(val_images, size, "val_images")
        yv = as_labels(val_labels, xv.shape[0], k, "val_labels") if conditional else None
        if xv.shape[0] < 1:
            raise ValueError("val_images is empty: validation (early stopping) needs at least one image")
        data = TrainData(x, y, xv, yv)
    if data.n_train < 2:
        raise ValueError(f"need at least 2 training images (BatchNorm), got {data.n_train}")
    return data


def uint8_to_float(batch: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 images (N, 1, H, W) as float32 in [0, 1], computed on the batch's own device.

    Args:
        batch: uint8 images.
        channels_last: return the channels-last memory format (matches a channels-last model).

    Returns:
        float32 images, ``batch / 255``.
    """
    x = batch.to(torch.float32).div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment_params(
    n: int, generator: torch.Generator, *, max_shift: int = 4, max_gain: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Random whole-pixel shifts (n, 2) and contrast gains (n,) for :func:`apply_augment`, on the CPU.

    Drawn from a CPU generator so that a run is reproducible on every device; the trainer draws a
    whole epoch's at once and moves them to the device once, not once per step.
    """
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(torch.float32)
    gains = 1.0 + (torch.rand(n, generator=generator) * 2.0 - 1.0) * max_gain
    return shifts, gains


def apply_augment(x: Tensor, shifts: Tensor, gains: Tensor) -> Tensor:
    """Shift each image by whole pixels (zero fill, nearest sampling) and scale its contrast, clipped.

    Args:
        x: float images (N, 1, H, W) in [0, 1], any device and memory format.
        shifts: (N, 2) pixel shifts (x, y), on ``x``'s device or the CPU.
        gains: (N,) contrast gains.

    Returns:
        The augmented batch, same shape, device and memory format.
    """
    n, _, h, w = x.shape
    shifts, gains = shifts.to(x.device), gains.to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -shifts[:, 0] * 2.0 / w  # normalised grid coordinates: one pixel is 2/size
    theta[:, 1, 2] = -shifts[:, 1] * 2.0 / h
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = nn.functional.grid_sample(
        x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    out = (out * gains.view(n, 1, 1, 1)).clamp_(0.0, 1.0)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augment_batch(
    x: Tensor, generator: torch.Generator, *, max_shift: int = 4, max_gain: float = 0.1
) -> Tensor:
    """Light augmentation of a float batch on its own device: a whole-pixel shift and a contrast gain.

    Each image moves by up to ``max_shift`` pixels in each direction and its intensities are scaled by
    a gain in ``1 ± max_gain``, then clipped to [0, 1]. No flips or rotations: a chest radiograph has a
    left and a right, and positioning is part of what normal looks like. The VAE then reconstructs the
    augmented image itself.

    Args:
        x: float images (N, 1, H, W) in [0, 1], any device and memory format.
        generator: a CPU generator for the random parameters.
        max_shift: the largest shift in pixels.
        max_gain: the largest relative change of contrast.

    Returns:
        The augmented batch, same shape, device and memory format.
    """
    shifts, gains = augment_params(x.shape[0], generator, max_shift=max_shift, max_gain=max_gain)
    return apply_augment(x, shifts, gains)


def to_device(data: TrainData, device: torch.device, val_share: slice) -> TrainData:
    """The one host-to-device copy of the data: every training image, this rank's share of validation.

    Each rank keeps the whole uint8 training set on its device (4 KiB per 64x64 image), so an epoch's
    shard is gathered there by index and no image crosses the host-device boundary per step or epoch.
    """

    def move(t: Tensor | None, rows: slice = slice(None)) -> Tensor | None:
        return t[rows].to(device) if t is not None else None

    x_train, x_val = move(data.x_train), move(data.x_val, val_share)
    assert x_train is not None and x_val is not None
    return TrainData(x_train, move(data.y_train), x_val, move(data.y_val, val_share))
