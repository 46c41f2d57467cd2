"""Batched, eval-mode inference over image stacks: the one home of every inference loop.

Scoring, sampling, pictures and the evaluation all run a trained VAE over many uint8 images. They share
these helpers, so every one of them converts images the same way, runs BatchNorm on its running
statistics, and never copies a whole store version to float at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from medvae.vae.model import ConvVAE

ImageBatch = np.ndarray | torch.Tensor
Labels = np.ndarray | torch.Tensor | Sequence[int] | None
Device = str | torch.device | None


def as_float_batch(images: ImageBatch) -> torch.Tensor:
    """Bring images into the model's input form: a float32 tensor (N, 1, H, W) in [0, 1].

    Args:
        images: uint8 arrays/tensors in 0..255 or float arrays/tensors in [0, 1], shaped (H, W),
            (N, H, W) or (N, 1, H, W).

    Returns:
        A float32 tensor on the same device as a tensor input (CPU for numpy input).

    Raises:
        ValueError: for an unsupported dtype or shape, or float values outside [0, 1].
    """
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype == torch.uint8:
        x = t.float().div_(255.0)
    elif t.is_floating_point():
        x = t.float()
        # Float input is taken as already scaled; values outside [0, 1] mean someone passed raw 0..255
        # floats or un-normalised data, which BCE and the uint8 round trip would silently mangle.
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError("float images must lie in [0, 1]; pass uint8 for 0..255 data")
    else:
        raise ValueError(f"images must be uint8 or floating point, got {t.dtype}")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images shaped (H, W), (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1], (N, 1, H, W), as a uint8 numpy array (N, H, W) (rounded, clamped)."""
    return x.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).squeeze(1).cpu().numpy()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards.

    Eval mode matters twice here: BatchNorm must use its running statistics (so one image's score does
    not depend on the rest of its batch) and the VAE's forward pass must use the posterior mean.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module, device: Device) -> torch.device:
    """The device to compute on: ``device`` (moving the model there, in place) or the model's own device."""
    if device is None:
        return next(model.parameters()).device
    dev = torch.device(device)
    model.to(dev)
    return dev


def resolve_labels(model: ConvVAE, labels: Labels, n: int, default_label: int | None) -> torch.Tensor | None:
    """Label indices for a conditional model, or None for an unconditional one.

    A CVAE encodes and decodes *given* a label. New scans to screen have no trusted label, so the caller
    names the class to score against (normally the normal class) as ``default_label``; it also fills
    rows marked unlabelled (negative, as :class:`medvae.data.dataset.StoreDataset` marks them).

    Args:
        model: the VAE.
        labels: one label index per image, or None.
        n: the number of images.
        default_label: the label index to use where none is given.

    Returns:
        A CPU int64 tensor (n,) for a conditional model; None for an unconditional one (labels ignored).

    Raises:
        ValueError: when a conditional model gets neither labels nor ``default_label``, the wrong number
            of labels, or an index out of range.
    """
    if not model.n_cond:
        return None
    if labels is None:
        if default_label is None:
            raise ValueError(
                "this VAE is conditional: pass one label index per image, or default_label (e.g. the "
                "normal class index) to score every image against that class"
            )
        y = torch.full((n,), int(default_label), dtype=torch.long)
    else:
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        y = y.detach().cpu().long().reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"got {y.shape[0]} labels for {n} images")
        if (y < 0).any():
            if default_label is None:
                raise ValueError("some labels are unknown (negative); pass default_label to fill them")
            y = torch.where(y < 0, torch.full_like(y, int(default_label)), y)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= model.n_cond):
        raise ValueError(f"label indices must lie in 0..{model.n_cond - 1}")
    return y


def iter_batches(
    model: ConvVAE,
    images: ImageBatch,
    labels: Labels,
    default_label: int | None,
    batch_size: int,
    dev: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` device batches of float images and label indices (see :func:`resolve_labels`)."""
    # Convert chunk by chunk: a float copy of a whole store version would be 4x the uint8 size in memory.
    n = len(images)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    y_all = resolve_labels(model, labels, n, default_label)
    for start in range(0, n, batch_size):
        x = as_float_batch(images[start : start + batch_size]).to(dev)
        y = None if y_all is None else y_all[start : start + batch_size].to(dev)
        yield x, y
