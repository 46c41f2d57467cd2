"""Train the VAE on a tensor-resident dataset: device choice, early stopping, atomic checkpoints and resume."""  # noqa: E501

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from medvae.config import LossConfig, TrainConfig
from medvae.engine import dist as distributed
from medvae.engine.dist import DistContext
from medvae.vae.losses import LossParts, kl_weight, negative_elbo
from medvae.vae.model import ConvVAE

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = "medvae-train-checkpoint"
_CHECKPOINT_VERSION = 1
# Settings that may change between an interrupted run and its resumption without changing the result of
# the epochs already done: more epochs, a different patience, another device, compilation on or off,
# BatchNorm synchronisation (it only acts with several processes). The number of processes is not part
# of the configuration at all: a checkpoint resumes at any world size (docs/distributed_training.md).
_RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "compile", "sync_batchnorm"})

ArrayLike = np.ndarray | Tensor


def select_device(requested: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """Resolve the configured device.

    Args:
        requested: ``"auto"`` (CUDA when a GPU is visible, else CPU), ``"cpu"`` or ``"cuda"``.

    Returns:
        The device to train on.

    Raises:
        RuntimeError: when CUDA is requested but no GPU is visible.
        ValueError: for any other string.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested but no GPU is visible; use --device cpu or auto")
        return torch.device("cuda")
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; expected 'auto', 'cpu' or 'cuda'")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) global random generators.

    Args:
        seed: any integer.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per epoch, derived from (seed, epoch) only: an epoch's shuffle does not depend on how
    # many epochs ran in this process, which is what makes resuming reproduce an uninterrupted run.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % 2**63)
    return g


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


def _use_channels_last(device: torch.device) -> bool:
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) run the convolutions and BatchNorm without layout
    # reorders. Measured on the 2-core Xeon dev box (benchmarks/train_throughput.py): it was the single
    # largest fp32 CPU gain over the default layout, so it is on for both device types.
    return device.type in ("cpu", "cuda")


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    # bf16 autocast on GPUs that support it: same exponent range as fp32, so no loss scaling is needed.
    # CPUs train in fp32: CPU bf16 speed depends on the chip (AMX or not) and it changes the numerics.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class TrainingSetup:
    """Everything one training step needs, built once by :func:`build_training`.

    Attributes:
        model: the VAE that owns the parameters (its state dict has no ``torch.compile`` prefixes).
        forward: ``model`` itself, or its ``torch.compile`` wrapper when compilation is on and worked.
        optimizer: Adam over ``model``'s parameters.
        loss_cfg: the negative-ELBO settings.
        device: where the model and the data live.
        amp_dtype: the autocast dtype, or None for plain fp32.
        channels_last: whether the model and the batches use the channels-last memory format.
        compile_checked: whether the compiled ``forward`` has run once (it falls back to eager if not).
        eager: what ``forward`` falls back to when compilation fails: ``model``, or its
            DistributedDataParallel wrapper when training in several processes (None means ``model``).
    """

    model: ConvVAE
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    loss_cfg: LossConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile_checked: bool = False
    eager: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.eager is None:
            self.eager = self.model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for forward passes (a no-op without mixed precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def _make_adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel does Adam's update in one pass over all parameters instead of ~10 elementwise ops
    # per tensor; it exists for CPU and CUDA in torch >= 2.4 and falls back to the default if not.
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_training(
    cfg: TrainConfig,
    device: torch.device,
    *,
    channels_last: bool | None = None,
    amp: Literal["auto", "off", "bf16"] = "auto",
    ddp: DistContext | None = None,
) -> TrainingSetup:
    """Build the model, optimizer and execution settings exactly as :func:`train_vae` uses them.

    The model is initialised from torch's global generator (seed it first), moved to ``device``, put in
    channels-last layout where that is faster and wrapped in ``torch.compile`` when ``cfg.compile`` is
    set. Compilation happens at the first step; if it fails there, :func:`train_step` warns and goes on
    in eager mode.

    Args:
        cfg: the training configuration.
        device: where to train.
        channels_last: force the memory format (None: the measured default for the device); for
            benchmarks.
        amp: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), or force ``"off"``/``"bf16"``; for benchmarks.
        ddp: the process group when training in several processes: BatchNorm is converted for
            synchronised statistics as ``cfg.sync_batchnorm`` says and ``forward`` is the
            DistributedDataParallel wrapper (compiled when asked); ``model`` stays the plain ConvVAE
            object with unchanged state-dict keys.

    Returns:
        The training setup; the model is in train mode.
    """
    model = ConvVAE(cfg.model).to(device)
    use_cl = _use_channels_last(device) if channels_last is None else channels_last
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    if ddp is not None:
        distributed.prepare_model(model, device, cfg.sync_batchnorm)
    optimizer = _make_adam(model, cfg)
    eager: nn.Module = model if ddp is None else distributed.wrap_ddp(model, device)
    forward: nn.Module = eager
    if cfg.compile:
        try:
            forward = torch.compile(eager)  # type: ignore[assignment]
        except Exception as exc:  # a missing compiler toolchain must not stop training
            warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=2)
            forward = eager
    amp_dtype = {"auto": _amp_dtype(device), "off": None, "bf16": torch.bfloat16}[amp]
    return TrainingSetup(model, forward, optimizer, cfg.loss, device, amp_dtype, use_cl, eager=eager)


def _forward_backward(setup: TrainingSetup, x: Tensor, y: Tensor | None, kl_w: float) -> LossParts:
    setup.optimizer.zero_grad(set_to_none=True)
    with setup.autocast():
        out = setup.forward(x, y)
    # The loss is formed outside autocast; negative_elbo upcasts bf16 outputs to float32 itself.
    parts = negative_elbo(out, x, setup.loss_cfg, kl_w)
    parts.loss.backward()
    return parts


def train_step(setup: TrainingSetup, x: Tensor, y: Tensor | None, kl_w: float) -> LossParts:
    """One optimisation step on a float batch.

    Args:
        setup: from :func:`build_training`.
        x: float images in [0, 1], (B, 1, H, W), on ``setup.device``.
        y: label indices (B,) for a conditional VAE, else None.
        kl_w: the KL weight of this epoch.

    Returns:
        The batch's loss parts, detached, still on the device (no host sync).
    """
    if setup.forward is not setup.eager and not setup.compile_checked:
        # torch.compile is lazy: a missing compiler or an unsupported op only shows at the first call.
        # Tracing and compiling run on fake tensors, so retrying eagerly repeats nothing that ran.
        try:
            parts = _forward_backward(setup, x, y, kl_w)
        except Exception as exc:
            warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=2)
            assert setup.eager is not None  # set by __post_init__
            setup.forward = setup.eager
            parts = _forward_backward(setup, x, y, kl_w)
        setup.compile_checked = True
    else:
        parts = _forward_backward(setup, x, y, kl_w)
    setup.optimizer.step()
    return LossParts(parts.loss.detach(), parts.recon.detach(), parts.kl.detach())


@dataclass
class EpochTotals:
    """Image-weighted mean losses over one pass, its image count and wall time."""

    loss: float
    recon: float
    kl: float
    images: int
    seconds: float


def _batches(n: int, batch_size: int, order: Tensor) -> Iterator[Tensor]:
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        # BatchNorm cannot normalise a batch of one in train mode; any larger remainder is kept.
        if idx.numel() < 2:
            continue
        yield idx


def _finish(sums: Tensor, images: int, start: float) -> EpochTotals:
    # The single host sync of the pass: reading the device-side sums also waits for the GPU queue, so
    # the measured time includes all queued work.
    loss, recon, kl = sums.tolist() if images else (math.nan, math.nan, math.nan)
    d = max(images, 1)
    return EpochTotals(loss / d, recon / d, kl / d, images, time.perf_counter() - start)


def augment_batch(
    x: Tensor, generator: torch.Generator, *, max_shift: int = 4, max_gain: float = 0.1
) -> Tensor:
    """Light augmentation of a float batch on its own device: a whole-pixel shift and a contrast gain.

    Each image moves by up to ``max_shift`` pixels in each direction (zero fill, nearest sampling, so
    no interpolation blur) and its intensities are scaled by a gain in ``1 ± max_gain``, then clipped
    to [0, 1]. No flips or rotations: a chest radiograph has a left and a right, and positioning is
    part of what normal looks like. The VAE then reconstructs the augmented image itself.

    Args:
        x: float images (N, 1, H, W) in [0, 1], any device and memory format.
        generator: a CPU generator for the random parameters (seeded per epoch by the trainer), so a
            run is reproducible on every device.
        max_shift: the largest shift in pixels.
        max_gain: the largest relative change of contrast.

    Returns:
        The augmented batch, same shape, device and memory format.
    """
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(torch.float32)
    gains = 1.0 + (torch.rand(n, generator=generator) * 2.0 - 1.0) * max_gain
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -shifts[:, 0] * 2.0 / w  # normalised grid coordinates: one pixel is 2/size
    theta[:, 1, 2] = -shifts[:, 1] * 2.0 / h
    theta, gains = theta.to(x.device), gains.to(x.device)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = nn.functional.grid_sample(
        x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    out = (out * gains.view(n, 1, 1, 1)).clamp_(0.0, 1.0)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def run_epoch(
    setup: TrainingSetup,
    images: Tensor,
    labels: Tensor | None,
    *,
    batch_size: int,
    kl_w: float,
    generator: torch.Generator,
    time_limit: float | None = None,
    augment: bool = False,
) -> EpochTotals:
    """One shuffled pass over a device-resident uint8 training set.

    Each batch is gathered from ``images`` with a slice of one device-side permutation and converted
    to float on the device, so no data crosses the host-device boundary per step, and the losses are
    summed in a device tensor and read once at the end (no per-step ``.item()`` sync).

    Args:
        setup: from :func:`build_training`.
        images: uint8 images (N, 1, H, W) on ``setup.device``.
        labels: int64 labels (N,) on ``setup.device`` for a conditional VAE, else None.
        batch_size: images per step; a last batch of one image is skipped (BatchNorm), larger ones kept.
        kl_w: the KL weight of this epoch.
        generator: a CPU generator for the shuffle (seeded per epoch by the trainer).
        time_limit: stop after the first step that ends past this many seconds (benchmarks only).
        augment: apply :func:`augment_batch` to every batch (its draws come from ``generator`` too).

    Returns:
        The image-weighted mean training losses of the pass.
    """
    start = time.perf_counter()
    n = images.shape[0]
    # Shuffled on the CPU so the order is the same on every device, then moved once per epoch.
    order = torch.randperm(n, generator=generator).to(setup.device, non_blocking=True)
    sums = torch.zeros(3, device=setup.device)
    seen = 0
    for idx in _batches(n, batch_size, order):
        x = uint8_to_float(images.index_select(0, idx), setup.channels_last)
        if augment:
            x = augment_batch(x, generator)
        y = labels.index_select(0, idx) if labels is not None else None
        parts = train_step(setup, x, y, kl_w)
        sums += torch.stack(parts) * idx.numel()
        seen += idx.numel()
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return _finish(sums, seen, start)


def run_epoch_sharded(
    setup: TrainingSetup,
    images: Tensor,
    labels: Tensor | None,
    *,
    batch_size: int,
    kl_w: float,
    generator: torch.Generator,
    ctx: DistContext,
    seed: int,
    epoch: int,
    augment: bool = False,
) -> EpochTotals:
    """One epoch of one rank in multi-process (DDP) training; the totals are global.

    Every rank draws the same permutation from ``generator`` (seeded by (seed, epoch), as one process
    does) and takes its slice of every global batch (:func:`medvae.engine.dist.epoch_shard`). Only that
    shard is copied to the device, once per epoch. The reparameterisation noise and the augmentation
    come from per-rank streams reseeded from (seed, epoch, rank), so ranks draw different noise and a
    resumed run at the same world size repeats the uninterrupted one.

    Args:
        setup: from :func:`build_training` with ``ddp`` set (``forward`` averages the gradients).
        images: all uint8 training images (N, 1, H, W), on the host.
        labels: int64 labels (N,) on the host for a conditional VAE, else None.
        batch_size: the global batch size (divisible by the world size).
        kl_w: the KL weight of this epoch.
        generator: the epoch's shuffle generator, identical on every rank.
        ctx: the distributed context.
        seed: ``cfg.seed``, for the per-rank streams.
        epoch: the 0-based epoch, for the per-rank streams.
        augment: apply :func:`augment_batch` to every batch.

    Returns:
        The image-weighted mean training losses over all ranks' images (identical on every rank).
    """
    start = time.perf_counter()
    order = torch.randperm(images.shape[0], generator=generator)
    idx, steps = distributed.epoch_shard(order, batch_size, ctx)
    x_shard = images.index_select(0, idx).to(setup.device, non_blocking=True)
    y_shard = labels.index_select(0, idx).to(setup.device) if labels is not None else None
    torch.manual_seed(distributed.rank_seed(seed, epoch, ctx.rank, 0))
    aug_gen = torch.Generator()
    aug_gen.manual_seed(distributed.rank_seed(seed, epoch, ctx.rank, 1))
    sums = torch.zeros(3, device=setup.device)
    pos = 0
    for b in steps:
        x = uint8_to_float(x_shard[pos : pos + b], setup.channels_last)
        if augment:
            x = augment_batch(x, aug_gen)
        y = y_shard[pos : pos + b] if y_shard is not None else None
        parts = train_step(setup, x, y, kl_w)
        sums += torch.stack(parts) * b
        pos += b
    # Image-weighted sums and the image count, summed over ranks: the history is global, not per rank.
    totals = torch.cat([sums.double(), sums.new_tensor([float(pos)], dtype=torch.float64)])
    distributed.all_reduce_sum(totals)
    return _finish(totals[:3], round(float(totals[3])), start)


def _eval_sums(
    setup: TrainingSetup, images: Tensor, labels: Tensor | None, batch_size: int, kl_w: float
) -> Tensor:
    model = setup.model  # eager: a compiled eval graph would cost a second compilation for ~10% of data
    model.eval()
    try:
        sums = torch.zeros(3, device=setup.device)
        n = images.shape[0]
        for s in range(0, n, batch_size):
            x = uint8_to_float(images[s : s + batch_size], setup.channels_last)
            y = labels[s : s + batch_size] if labels is not None else None
            with setup.autocast():
                out = model(x, y)
            parts = negative_elbo(out, x, setup.loss_cfg, kl_w)
            sums += torch.stack(parts) * x.shape[0]
        return sums
    finally:
        model.train()


@torch.no_grad()
def evaluate_sharded(
    setup: TrainingSetup,
    images: Tensor,
    labels: Tensor | None,
    *,
    batch_size: int,
    kl_w: float,
    ctx: DistContext,
) -> EpochTotals:
    """:func:`evaluate` over all ranks: each evaluates its shard of the validation set, sums are all-reduced.

    The ranks' BatchNorm running statistics are averaged first (:func:`medvae.engine.dist.average_buffers`),
    so every rank evaluates, and later saves, the same model, and early stopping decides the same on all.

    Args:
        setup: from :func:`build_training` with ``ddp`` set.
        images: this rank's uint8 validation shard on ``setup.device`` (it may be empty).
        labels: its int64 labels for a conditional VAE, else None.
        batch_size: images per forward pass.
        kl_w: the KL weight.
        ctx: the distributed context.

    Returns:
        Image-weighted mean losses over the whole validation set, identical on every rank.
    """
    start = time.perf_counter()
    distributed.average_buffers(setup.model, ctx)
    sums = _eval_sums(setup, images, labels, batch_size, kl_w)
    totals = torch.cat([sums.double(), sums.new_tensor([float(images.shape[0])], dtype=torch.float64)])
    distributed.all_reduce_sum(totals)
    return _finish(totals[:3], round(float(totals[3])), start)


@torch.no_grad()
def evaluate(
    setup: TrainingSetup, images: Tensor, labels: Tensor | None, *, batch_size: int, kl_w: float
) -> EpochTotals:
    """The negative ELBO of a device-resident uint8 set in eval mode (running BatchNorm stats, z = μ).

    Args:
        setup: from :func:`build_training`.
        images: uint8 images (N, 1, H, W) on ``setup.device``.
        labels: int64 labels (N,) for a conditional VAE, else None.
        batch_size: images per forward pass.
        kl_w: the KL weight (the trainer uses ``beta`` so that epochs compare).

    Returns:
        Image-weighted mean losses; the model is returned to train mode.
    """
    start = time.perf_counter()
    return _finish(_eval_sums(setup, images, labels, batch_size, kl_w), images.shape[0], start)


@dataclass
class TrainResult:
    """The outcome of :func:`train_vae`.

    Attributes:
        model: the best-validation model, in eval mode, left on the training device (call ``.cpu()``
            to move it); it is never the ``torch.compile`` wrapper.
        history: one plain dict per epoch with keys ``epoch, loss, recon, kl, kl_weight, val_loss,
            val_recon, val_kl, seconds, img_per_s`` (``history[i]["epoch"] == i``, also across resumes).
        best_epoch: the 0-based epoch with the lowest validation loss, whose weights ``model`` holds.
        stopped_early: whether early stopping ended training before ``cfg.epochs``.
        device: the device trained on, e.g. ``"cpu"`` or ``"cuda"``.
    """

    model: ConvVAE
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    device: str = "cpu"


def _as_images(images: ArrayLike, size: int, what: str) -> Tensor:
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


def _as_labels(labels: ArrayLike | None, n: int, num_classes: int, what: str) -> Tensor:
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


def _split(
    images: Tensor, labels: Tensor | None, fraction: float, seed: int
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    n = images.shape[0]
    n_val = max(1, round(n * fraction))
    if n - n_val < 2:
        raise ValueError(
            f"{n} images leave fewer than 2 for training after holding out {n_val} for validation"
        )
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val, train = perm[:n_val], perm[n_val:]
    return (
        images[train],
        labels[train] if labels is not None else None,
        images[val],
        labels[val] if labels is not None else None,
    )


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _resumable_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RESUMABLE_CHANGES}


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    # Write beside the target, fsync, then rename: a crash leaves either the old or the new checkpoint,
    # never a torn one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself; not possible on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``: tensors and plain data only, no code).

    Args:
        path: a ``checkpoint.pt`` written by :func:`train_vae`.
        map_location: where to put its tensors.

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: when the file is not a medvae training checkpoint.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medvae training checkpoint")
    if ckpt.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    return ckpt


def _fmt(v: float) -> str:
    return f"{v:.4g}"


@dataclass
class _TrainState:
    """The selection state that a checkpoint records beside the weights."""

    epoch: int
    best_state: dict[str, Tensor]
    best_val: float
    best_epoch: int
    bad_epochs: int
    stopped_early: bool


def _checkpoint(
    setup: TrainingSetup,
    cfg: TrainConfig,
    state: _TrainState,
    history: list[dict[str, Any]],
    n_train: int,
    n_val: int,
    gen: torch.Generator,
    world_size: int = 1,
) -> dict[str, Any]:
    # Nothing in it depends on the number of processes: the unwrapped model's state (plain BatchNorm
    # keys), the optimizer, the selection state and the global history. world_size is informative.
    ckpt = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "best_state": state.best_state,
        "best_val": state.best_val,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "history": history,
        "config": _resumable_config(cfg),
        "n_train": n_train,
        "n_val": n_val,
        # The global RNG draws the reparameterisation noise; the shuffle generator is
        # re-derived from (seed, epoch), its state is kept for inspection only.
        "rng_cpu": torch.get_rng_state(),
        "generator": gen.get_state(),
    }
    if world_size > 1:
        ckpt["world_size"] = world_size
    if setup.device.type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state()
    return ckpt


def _save_checkpoint(
    path: Path,
    setup: TrainingSetup,
    cfg: TrainConfig,
    state: _TrainState,
    history: list[dict[str, Any]],
    n_train: int,
    n_val: int,
    gen: torch.Generator,
    world_size: int,
) -> None:
    _atomic_torch_save(_checkpoint(setup, cfg, state, history, n_train, n_val, gen, world_size), path)


def train_vae(
    images: ArrayLike,
    labels: ArrayLike | None,
    cfg: TrainConfig,
    *,
    val_images: ArrayLike | None = None,
    val_labels: ArrayLike | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the (conditional) VAE with validation, early stopping and optional checkpoints.

    The whole uint8 training set is moved to the device once; batches are gathered and converted to
    float there. On CUDA the forward pass runs under bf16 autocast; the model and batches use the
    channels-last layout; ``cfg.compile`` wraps the model in ``torch.compile``.

    Validation runs after every epoch in eval mode (deterministic, z = μ) with the KL weight fixed at
    ``beta`` so that epochs compare during the KL warm-up. Selection starts when the warm-up ends (the
    warm-up epochs never count as best or against patience); training then stops after ``cfg.patience``
    epochs without a strictly lower validation loss, and the best epoch's weights are restored at the end.

    With ``checkpoint_dir``, ``checkpoint.pt`` is rewritten atomically after every epoch. ``resume=True``
    continues after the last completed epoch; on the CPU the result is bit-identical to an uninterrupted
    run (each epoch's shuffle comes from a generator seeded by (seed, epoch) and the global RNG state,
    which draws the reparameterisation noise, is restored). When there is no checkpoint yet it starts
    from scratch. The global RNGs are seeded with ``cfg.seed`` (:func:`seed_everything`).

    Inside a process group of several processes (torchrun, see :mod:`medvae.engine.dist`) it trains
    with DistributedDataParallel: the global batch stays ``cfg.batch_size``, each rank moves only its
    shard of each epoch's permutation to its device, validation is sharded and all-reduced, so the
    history and every early-stopping decision are global and identical on all ranks, and rank 0 alone
    writes the checkpoint (the others wait for it). The checkpoint does not depend on the number of
    processes: it resumes at any world size, with a different random stream (not bit-identical) when
    the world size changes. Every rank returns the same best model.

    Args:
        images: uint8 training images (N, H, W) or (N, 1, H, W), H = W = ``cfg.model.image_size``.
        labels: integer class indices (N,); required for a conditional VAE, ignored otherwise.
        cfg: the training configuration (seed, device, model, loss, ...).
        val_images: uint8 validation images. Callers normally pass the store's patient-grouped val
            split; when None, a seeded random ``cfg.val_fraction`` of ``images`` is held out instead
            (which is not patient-grouped).
        val_labels: class indices of ``val_images`` (conditional VAE only).
        checkpoint_dir: where to write ``checkpoint.pt``; created if missing.
        resume: continue from ``checkpoint_dir/checkpoint.pt``.
        progress: show a rich progress bar over epochs.

    Returns:
        The best model (eval mode, on the training device) with the per-epoch history.

    Raises:
        ValueError: for inconsistent data, missing labels of a conditional VAE, or a checkpoint made
            with a different configuration or dataset size.
        RuntimeError: when CUDA is requested but absent, or the training loss becomes non-finite.
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    ddp = distributed.current()
    device = select_device(cfg.device)
    if ddp is not None:
        device = distributed.training_device(ddp, device.type)
    main = ddp is None or ddp.is_main
    size = cfg.model.image_size
    conditional = cfg.model.conditional

    x_all = _as_images(images, size, "images")
    y_all = _as_labels(labels, x_all.shape[0], cfg.model.num_classes, "labels") if conditional else None
    if val_images is None:
        x_tr, y_tr, x_va, y_va = _split(x_all, y_all, cfg.val_fraction, cfg.seed)
    else:
        x_tr, y_tr = x_all, y_all
        x_va = _as_images(val_images, size, "val_images")
        y_va = (
            _as_labels(val_labels, x_va.shape[0], cfg.model.num_classes, "val_labels")
            if conditional
            else None
        )
        if x_va.shape[0] < 1:
            raise ValueError("val_images is empty: validation (early stopping) needs at least one image")
    if x_tr.shape[0] < 2:
        raise ValueError(f"need at least 2 training images (BatchNorm), got {x_tr.shape[0]}")
    n_train, n_val = int(x_tr.shape[0]), int(x_va.shape[0])

    if ddp is None:
        # The one host->device copy of the data: 4 KiB per 64x64 uint8 image.
        x_tr, x_va = x_tr.to(device), x_va.to(device)
        y_tr = y_tr.to(device) if y_tr is not None else None
        y_va = y_va.to(device) if y_va is not None else None
    else:
        distributed.per_rank_batch(cfg.batch_size, ddp.world_size, n_train)
        # Training images stay on the host: each epoch moves this rank's shard of them to the device
        # (run_epoch_sharded). The validation shard is fixed, so it moves once.
        mine = distributed.shard_slice(n_val, ddp)
        x_va = x_va[mine].to(device)
        y_va = y_va[mine].to(device) if y_va is not None else None
    if device.type == "cuda":
        # Fixed shapes every step, so cuDNN's per-shape algorithm search pays off after the first batch.
        torch.backends.cudnn.benchmark = True

    seed_everything(cfg.seed)
    setup = build_training(cfg, device, ddp=ddp)
    history: list[dict[str, Any]] = []
    best_val, best_epoch, bad_epochs, stopped_early = math.inf, 0, 0, False
    best_state = _clone_state(setup.model)
    start_epoch = 0

    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_dir is not None and main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] | None = None
    if resume and ckpt_path is not None:
        if ddp is None:
            ckpt = load_checkpoint(ckpt_path, map_location=device) if ckpt_path.exists() else None
        else:
            # Rank 0 reads it and sends it to the others: on several nodes only rank 0's filesystem is
            # sure to hold the checkpoint, and a rank that started afresh while rank 0 resumed would
            # train a different number of epochs and hang the others.
            path = ckpt_path
            ckpt = distributed.on_main(lambda: load_checkpoint(path) if path.exists() else None, ddp)
    if ckpt is not None:
        if ckpt["config"] != _resumable_config(cfg):
            raise ValueError(
                f"{ckpt_path} was written with a different configuration; only "
                f"{sorted(_RESUMABLE_CHANGES)} may change when resuming"
            )
        if (ckpt["n_train"], ckpt["n_val"]) != (n_train, n_val):
            raise ValueError(
                f"{ckpt_path} was written for {ckpt['n_train']} train / {ckpt['n_val']} val images, "
                f"not {n_train} / {n_val}"
            )
        setup.model.load_state_dict(ckpt["model"])
        setup.optimizer.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_state"]
        best_val, best_epoch = float(ckpt["best_val"]), int(ckpt["best_epoch"])
        bad_epochs, stopped_early = int(ckpt["bad_epochs"]), bool(ckpt["stopped_early"])
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"]) + 1
        # (Several processes reseed their streams per epoch and rank instead; see run_epoch_sharded.)
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())

    columns = (
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, disable=not (progress and main), transient=False) as bar:
        task = bar.add_task("train", total=cfg.epochs, completed=min(start_epoch, cfg.epochs), metrics="")
        for epoch in range(start_epoch, cfg.epochs):
            if stopped_early:
                break
            w = kl_weight(epoch, cfg.loss)
            gen = _epoch_generator(cfg.seed, epoch)
            if ddp is None:
                tr = run_epoch(
                    setup, x_tr, y_tr, batch_size=cfg.batch_size, kl_w=w, generator=gen, augment=cfg.augment
                )
            else:
                tr = run_epoch_sharded(
                    setup,
                    x_tr,
                    y_tr,
                    batch_size=cfg.batch_size,
                    kl_w=w,
                    generator=gen,
                    ctx=ddp,
                    seed=cfg.seed,
                    epoch=epoch,
                    augment=cfg.augment,
                )
            # Global (all-reduced) figures under DDP: every rank takes the same decisions below.
            if not math.isfinite(tr.loss):
                raise RuntimeError(f"training diverged: non-finite loss at epoch {epoch}; try a lower lr")
            if ddp is None:
                va = evaluate(setup, x_va, y_va, batch_size=cfg.batch_size, kl_w=cfg.loss.beta)
            else:
                va = evaluate_sharded(
                    setup, x_va, y_va, batch_size=cfg.batch_size, kl_w=cfg.loss.beta, ctx=ddp
                )
            seconds = tr.seconds + va.seconds
            history.append(
                {
                    "epoch": epoch,
                    "loss": tr.loss,
                    "recon": tr.recon,
                    "kl": tr.kl,
                    "kl_weight": w,
                    "val_loss": va.loss,
                    "val_recon": va.recon,
                    "val_kl": va.kl,
                    "seconds": seconds,
                    "img_per_s": tr.images / tr.seconds if tr.seconds > 0 else 0.0,
                }
            )
            if epoch < cfg.loss.kl_warmup_epochs:
                # During the KL warm-up the model is still being pulled towards the prior, and its val
                # ELBO can look best at epoch 0 or 1, before the KL term bites. Selecting or stopping on
                # those epochs kept an untrained model (measured: the tutorial recipe at batch 128 stopped
                # at epoch 10 with epoch 1's weights, SSIM 0.12). So warm-up epochs never count against
                # patience, and the model at the end of the warm-up is where selection starts.
                best_val, best_epoch, bad_epochs = va.loss, epoch, 0
                best_state = _clone_state(setup.model)
            elif va.loss < best_val:  # NaN never compares lower, so a NaN epoch counts as no improvement
                best_val, best_epoch, bad_epochs = va.loss, epoch, 0
                best_state = _clone_state(setup.model)
            else:
                bad_epochs += 1
                stopped_early = bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs
            if ckpt_path is not None:
                state = _TrainState(epoch, best_state, best_val, best_epoch, bad_epochs, stopped_early)
                if ddp is None:
                    ckpt = _checkpoint(setup, cfg, state, history, n_train, n_val, gen)
                    _atomic_torch_save(ckpt, ckpt_path)
                else:
                    # Rank 0 writes; the others wait for it, and fail with it, so that none runs ahead.
                    distributed.on_main(
                        functools.partial(
                            _save_checkpoint,
                            ckpt_path,
                            setup,
                            cfg,
                            state,
                            history,
                            n_train,
                            n_val,
                            gen,
                            ddp.world_size,
                        ),
                        ddp,
                    )
            bar.update(
                task,
                advance=1,
                metrics=f"loss {_fmt(tr.loss)}  recon {_fmt(tr.recon)}  KL {_fmt(tr.kl)}  "
                f"val {_fmt(va.loss)}  ({tr.images / max(tr.seconds, 1e-9):.0f} img/s)",
            )

    if ddp is None:
        setup.model.load_state_dict(best_state)
        setup.model.eval()
        model = setup.model
    else:
        # A plain ConvVAE (no SyncBatchNorm layers) with the same state-dict keys: what scoring and
        # the model directory expect, whatever the BatchNorm layers were while training.
        model = ConvVAE(cfg.model).to(device)
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(best_state)
        model.eval()
    return TrainResult(
        model=model,
        history=copy.deepcopy(history),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        device=device.type,
    )
