"""Train the VAE on a tensor-resident dataset: device choice, early stopping, atomic checkpoints and resume."""  # noqa: E501

from __future__ import annotations

import contextlib
import copy
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
from medvae.losses import LossParts, kl_weight, negative_elbo
from medvae.model import ConvVAE

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = "medvae-train-checkpoint"
_CHECKPOINT_VERSION = 1
# Settings that may change between an interrupted run and its resumption without changing the result of
# the epochs already done: more epochs, a different patience, another device, compilation on or off.
_RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "compile"})

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
    """

    model: ConvVAE
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    loss_cfg: LossConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile_checked: bool = False

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

    Returns:
        The training setup; the model is in train mode.
    """
    model = ConvVAE(cfg.model).to(device)
    use_cl = _use_channels_last(device) if channels_last is None else channels_last
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = _make_adam(model, cfg)
    forward: nn.Module = model
    if cfg.compile:
        try:
            forward = torch.compile(model)  # type: ignore[assignment]
        except Exception as exc:  # a missing compiler toolchain must not stop training
            warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=2)
            forward = model
    amp_dtype = {"auto": _amp_dtype(device), "off": None, "bf16": torch.bfloat16}[amp]
    return TrainingSetup(model, forward, optimizer, cfg.loss, device, amp_dtype, use_cl)


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
    if setup.forward is not setup.model and not setup.compile_checked:
        # torch.compile is lazy: a missing compiler or an unsupported op only shows at the first call.
        # Tracing and compiling run on fake tensors, so retrying eagerly repeats nothing that ran.
        try:
            parts = _forward_backward(setup, x, y, kl_w)
        except Exception as exc:
            warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=2)
            setup.forward = setup.model
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
        return _finish(sums, n, start)
    finally:
        model.train()


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
    device = select_device(cfg.device)
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

    # The one host->device copy of the data: 4 KiB per 64x64 uint8 image.
    x_tr, x_va = x_tr.to(device), x_va.to(device)
    y_tr = y_tr.to(device) if y_tr is not None else None
    y_va = y_va.to(device) if y_va is not None else None
    if device.type == "cuda":
        # Fixed shapes every step, so cuDNN's per-shape algorithm search pays off after the first batch.
        torch.backends.cudnn.benchmark = True

    seed_everything(cfg.seed)
    setup = build_training(cfg, device)
    history: list[dict[str, Any]] = []
    best_val, best_epoch, bad_epochs, stopped_early = math.inf, 0, 0, False
    best_state = _clone_state(setup.model)
    start_epoch = 0

    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt["config"] != _resumable_config(cfg):
            raise ValueError(
                f"{ckpt_path} was written with a different configuration; only "
                f"{sorted(_RESUMABLE_CHANGES)} may change when resuming"
            )
        if (ckpt["n_train"], ckpt["n_val"]) != (x_tr.shape[0], x_va.shape[0]):
            raise ValueError(
                f"{ckpt_path} was written for {ckpt['n_train']} train / {ckpt['n_val']} val images, "
                f"not {x_tr.shape[0]} / {x_va.shape[0]}"
            )
        setup.model.load_state_dict(ckpt["model"])
        setup.optimizer.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_state"]
        best_val, best_epoch = float(ckpt["best_val"]), int(ckpt["best_epoch"])
        bad_epochs, stopped_early = int(ckpt["bad_epochs"]), bool(ckpt["stopped_early"])
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"]) + 1
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
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=cfg.epochs, completed=min(start_epoch, cfg.epochs), metrics="")
        for epoch in range(start_epoch, cfg.epochs):
            if stopped_early:
                break
            w = kl_weight(epoch, cfg.loss)
            gen = _epoch_generator(cfg.seed, epoch)
            tr = run_epoch(
                setup, x_tr, y_tr, batch_size=cfg.batch_size, kl_w=w, generator=gen, augment=cfg.augment
            )
            if not math.isfinite(tr.loss):
                raise RuntimeError(f"training diverged: non-finite loss at epoch {epoch}; try a lower lr")
            va = evaluate(setup, x_va, y_va, batch_size=cfg.batch_size, kl_w=cfg.loss.beta)
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
                ckpt = {
                    "format": _CHECKPOINT_FORMAT,
                    "version": _CHECKPOINT_VERSION,
                    "epoch": epoch,
                    "model": setup.model.state_dict(),
                    "optimizer": setup.optimizer.state_dict(),
                    "best_state": best_state,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped_early,
                    "history": history,
                    "config": _resumable_config(cfg),
                    "n_train": int(x_tr.shape[0]),
                    "n_val": int(x_va.shape[0]),
                    # The global RNG draws the reparameterisation noise; the shuffle generator is
                    # re-derived from (seed, epoch), its state is kept for inspection only.
                    "rng_cpu": torch.get_rng_state(),
                    "generator": gen.get_state(),
                }
                if device.type == "cuda":
                    ckpt["rng_cuda"] = torch.cuda.get_rng_state()
                _atomic_torch_save(ckpt, ckpt_path)
            bar.update(
                task,
                advance=1,
                metrics=f"loss {_fmt(tr.loss)}  recon {_fmt(tr.recon)}  KL {_fmt(tr.kl)}  "
                f"val {_fmt(va.loss)}  ({tr.images / max(tr.seconds, 1e-9):.0f} img/s)",
            )

    setup.model.load_state_dict(best_state)
    setup.model.eval()
    return TrainResult(
        model=setup.model,
        history=copy.deepcopy(history),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        device=device.type,
    )
