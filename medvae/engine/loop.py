"""The training loop: one epoch loop and one evaluation loop for one process and for many.

What differs between one process and several is the :class:`~medvae.engine.strategy.Strategy`'s
business (this rank's shard, sums over ranks, the model wrapper); what happens after an epoch (model
selection, checkpoints, progress) is the callbacks' (:mod:`medvae.engine.callbacks`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medvae.config import LossConfig, TrainConfig
from medvae.engine.data import (
    TrainData,
    apply_augment,
    augment_params,
    epoch_generator,
    rank_seed,
    uint8_to_float,
)
from medvae.engine.device import autocast, autocast_dtype, use_channels_last, use_sync_batchnorm
from medvae.engine.strategy import Strategy, average_buffers
from medvae.vae.losses import kl_weight, negative_elbo
from medvae.vae.model import ConvVAE


@dataclass
class Engine:
    """Everything a training step needs, built once by :func:`build_engine`.

    Attributes:
        model: the VAE that owns the parameters (plain state-dict keys, whatever wraps it).
        module: what a step calls: ``eager``, or its ``torch.compile`` wrapper.
        eager: ``model`` as the strategy wrapped it (itself, or DDP); the fallback if compiling fails.
        optimizer: Adam over ``model``'s parameters.
        loss_cfg: the negative-ELBO settings, resolved for the kind of model (`TrainConfig.resolved_loss`).
        device: where the model and the data live.
        amp_dtype: the autocast dtype, or None for plain fp32.
        channels_last: whether the model and the batches use the channels-last memory format.
        checked: whether ``module`` has run a step (a compiled one may still fail at its first).
    """

    model: ConvVAE
    module: nn.Module
    eager: nn.Module
    optimizer: torch.optim.Optimizer
    loss_cfg: LossConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    checked: bool = False


def _make_adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel does Adam's update in one pass over all parameters instead of ~10 elementwise ops
    # per tensor (CPU and CUDA, torch >= 2.4); anything older gets the default implementation.
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _compiled(module: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return module
    try:
        return torch.compile(module)  # type: ignore[return-value]
    except Exception as exc:  # a missing compiler toolchain must not stop training
        warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=3)
        return module


def build_engine(
    cfg: TrainConfig,
    strategy: Strategy,
    *,
    channels_last: bool | None = None,
    amp: Literal["auto", "off", "bf16"] = "auto",
) -> Engine:
    """Build the model, its wrapper and optimizer on ``strategy.device`` exactly as training uses them.

    The model is initialised from torch's global generator (seed it first), put in channels-last
    layout where that is faster, wrapped by the strategy (DDP, SyncBatchNorm on CUDA) and by
    ``torch.compile`` when ``cfg.compile`` is set (compilation happens at the first step).

    Args:
        cfg: the training configuration.
        strategy: this rank's strategy.
        channels_last: force the memory format (None: the measured default); for benchmarks.
        amp: ``"auto"`` (bf16 on CUDA, fp32 on CPU), or force ``"off"``/``"bf16"``; for benchmarks.

    Returns:
        The engine; the model is in train mode.

    Raises:
        ValueError: for ``sync_batchnorm=on`` without CUDA.
    """
    device = strategy.device
    sync_bn = use_sync_batchnorm(cfg.sync_batchnorm, device)
    model = ConvVAE(cfg.model).to(device)
    cl = use_channels_last(device) if channels_last is None else channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    eager = strategy.wrap(model, sync_bn)
    optimizer = _make_adam(model, cfg)
    dtype = {"auto": autocast_dtype(device), "off": None, "bf16": torch.bfloat16}[amp]
    loss = cfg.resolved_loss
    return Engine(model, _compiled(eager, cfg.compile), eager, optimizer, loss, device, dtype, cl)


def _forward_backward(engine: Engine, x: Tensor, y: Tensor | None, kl_w: float) -> Tensor:
    engine.optimizer.zero_grad(set_to_none=True)
    with autocast(engine.device, engine.amp_dtype):
        out = engine.module(x, y)
    # The loss is formed outside autocast; negative_elbo upcasts bf16 outputs to float32 itself.
    parts = negative_elbo(out, x, engine.loss_cfg, kl_w)
    parts.loss.backward()
    return torch.stack(parts).detach()


def train_step(engine: Engine, x: Tensor, y: Tensor | None, kl_w: float) -> Tensor:
    """One optimisation step on a float batch.

    A compiled module that fails at its first step (no compiler, an unsupported op: ``torch.compile``
    is lazy) is replaced by the eager one with a warning; tracing runs on fake tensors, so the retry
    repeats nothing that ran.

    Args:
        engine: from :func:`build_engine`.
        x: float images in [0, 1], (B, 1, H, W), on ``engine.device``.
        y: label indices (B,) for a conditional VAE, else None.
        kl_w: the KL weight of this epoch.

    Returns:
        ``[loss, recon, kl]`` of the batch, detached, still on the device (no host sync).
    """
    try:
        parts = _forward_backward(engine, x, y, kl_w)
    except Exception as exc:
        if engine.checked or engine.module is engine.eager:
            raise
        warnings.warn(f"torch.compile failed ({exc!r}); training without compilation", stacklevel=2)
        engine.module = engine.eager
        parts = _forward_backward(engine, x, y, kl_w)
    engine.checked = True
    engine.optimizer.step()
    return parts


@dataclass
class EpochTotals:
    """Image-weighted mean losses over one pass (all ranks), its image count and wall time."""

    loss: float
    recon: float
    kl: float
    images: int
    seconds: float


def _totals(strategy: Strategy, sums: Tensor, images: int, start: float) -> EpochTotals:
    # The pass's single host sync: reading the (all-reduced) sums also waits for the device queue, so
    # the measured time includes all queued work.
    t = torch.cat([sums.double(), sums.new_tensor([images], dtype=torch.float64)])
    loss, recon, kl, n = strategy.all_reduce(t).tolist()
    d = max(n, 1.0)
    if not n:
        loss = recon = kl = math.nan
    return EpochTotals(loss / d, recon / d, kl / d, round(n), time.perf_counter() - start)


def _epoch_augment(n: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # The whole epoch's augmentation parameters in one host-to-device copy, not one per step.
    shifts, gains = augment_params(n, torch.Generator().manual_seed(seed))
    return shifts.to(device), gains.to(device)


def run_epoch(
    engine: Engine,
    images: Tensor,
    labels: Tensor | None,
    strategy: Strategy,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    kl_w: float,
    augment: bool = False,
    time_limit: float | None = None,
) -> EpochTotals:
    """One shuffled pass of this rank over its shard of a device-resident uint8 training set.

    Every rank draws the same permutation (seeded by (seed, epoch)) and takes its shard of each global
    batch (:meth:`Strategy.shard`). Batches are gathered from ``images`` by index on the device and
    converted to float there; losses are summed on the device and read once, all-reduced, at the end.
    torch's global generator (the reparameterisation noise) and the augmentation are reseeded from
    (seed, epoch, rank), so a resumed run repeats an uninterrupted one exactly.

    Args:
        engine: from :func:`build_engine`.
        images: all uint8 training images (N, 1, H, W) on ``engine.device``.
        labels: their int64 labels on the device for a conditional VAE, else None.
        strategy: this rank's strategy.
        epoch: the 0-based epoch.
        seed: ``cfg.seed``.
        batch_size: the global batch size.
        kl_w: the KL weight of this epoch.
        augment: apply :func:`~medvae.engine.data.apply_augment` to every batch.
        time_limit: one process only (benchmarks): stop after the first step past this many seconds.

    Returns:
        The image-weighted mean training losses over all ranks' images.
    """
    start = time.perf_counter()
    order = torch.randperm(images.shape[0], generator=epoch_generator(seed, epoch))
    idx, steps = strategy.shard(order, batch_size)
    idx = idx.to(engine.device)
    torch.manual_seed(rank_seed(seed, epoch, strategy.rank, 0))
    aug_seed = rank_seed(seed, epoch, strategy.rank, 1)
    aug = _epoch_augment(idx.numel(), aug_seed, engine.device) if augment else None
    sums = torch.zeros(3, device=engine.device)
    pos = 0
    for b in steps:
        batch = idx[pos : pos + b]
        x = uint8_to_float(images.index_select(0, batch), engine.channels_last)
        if aug is not None:
            x = apply_augment(x, aug[0][pos : pos + b], aug[1][pos : pos + b])
        y = labels.index_select(0, batch) if labels is not None else None
        sums.add_(train_step(engine, x, y, kl_w), alpha=b)
        pos += b
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return _totals(strategy, sums, pos, start)


def evaluate(
    engine: Engine,
    images: Tensor,
    labels: Tensor | None,
    strategy: Strategy,
    *,
    batch_size: int,
    kl_w: float,
) -> EpochTotals:
    """The negative ELBO of this rank's uint8 validation share in eval mode, summed over all ranks.

    Eval mode means running BatchNorm statistics and z = μ, so it is deterministic. It runs the
    eager, unwrapped model: no gradients to average, and a compiled eval graph would cost a second
    compilation for a tenth of the data.

    Args:
        engine: from :func:`build_engine`.
        images: this rank's uint8 validation images (N, 1, H, W) on ``engine.device`` (may be empty).
        labels: their int64 labels for a conditional VAE, else None.
        strategy: this rank's strategy.
        batch_size: images per forward pass.
        kl_w: the KL weight (the trainer uses ``beta`` so that epochs compare).

    Returns:
        Image-weighted mean losses over every rank's images; the model is back in train mode.
    """
    start = time.perf_counter()
    model = engine.model
    model.eval()
    try:
        with torch.inference_mode():
            sums = torch.zeros(3, device=engine.device)
            for s in range(0, images.shape[0], batch_size):
                x = uint8_to_float(images[s : s + batch_size], engine.channels_last)
                y = labels[s : s + batch_size] if labels is not None else None
                with autocast(engine.device, engine.amp_dtype):
                    out = model(x, y)
                sums.add_(torch.stack(negative_elbo(out, x, engine.loss_cfg, kl_w)), alpha=x.shape[0])
    finally:
        model.train()
    return _totals(strategy, sums.clone(), images.shape[0], start)


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model``'s state dict (the best weights so far)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class TrainState:
    """What the loop and its callbacks share, and what a checkpoint records beside the weights.

    Attributes:
        best_state: the selected weights (initially the untrained model's).
        epoch: the last completed epoch (-1 before the first).
        history: one record per completed epoch (see :class:`~medvae.engine.trainer.TrainResult`).
        best_val: the selected epoch's validation loss.
        best_epoch: the selected epoch.
        bad_epochs: epochs since the last improvement.
        stopped_early: whether early stopping ended the run.
    """

    best_state: dict[str, Tensor]
    epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as a checkpoint stores them."""
        return dict(vars(self))

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """The state recorded by a checkpoint (see :meth:`to_checkpoint`)."""
        return cls(
            best_state=ckpt["best_state"],
            epoch=int(ckpt["epoch"]),
            history=list(ckpt["history"]),
            best_val=float(ckpt["best_val"]),
            best_epoch=int(ckpt["best_epoch"]),
            bad_epochs=int(ckpt["bad_epochs"]),
            stopped_early=bool(ckpt["stopped_early"]),
        )


@dataclass
class Run:
    """One training run as callbacks see it: its configuration, engine, strategy and state."""

    cfg: TrainConfig
    engine: Engine
    strategy: Strategy
    state: TrainState


class Callback:
    """Hooks on the loop; every hook runs on every rank (use ``run.strategy.on_main`` for rank-0 work)."""

    def on_fit_start(self, run: Run) -> None:
        """Before the first epoch of this process (after a resume, the first remaining one)."""

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        """After an epoch's training and validation; ``record`` is already in ``run.state.history``."""

    def on_fit_end(self, run: Run) -> None:
        """After the last epoch, and also when the loop raises (to close what ``on_fit_start`` opened)."""


def _one_epoch(run: Run, data: TrainData, epoch: int) -> dict[str, Any]:
    cfg, engine, strategy = run.cfg, run.engine, run.strategy
    w = kl_weight(epoch, cfg.loss)
    tr = run_epoch(
        engine,
        data.x_train,
        data.y_train,
        strategy,
        epoch=epoch,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        kl_w=w,
        augment=cfg.augment,
    )
    if not math.isfinite(tr.loss):  # global figures: every rank stops together
        raise RuntimeError(f"training diverged: non-finite loss at epoch {epoch}; try a lower lr")
    # Ranks' per-process BatchNorm statistics follow their shards: average them, so that every rank
    # validates and saves the same model.
    average_buffers(engine.model, strategy)
    va = evaluate(engine, data.x_val, data.y_val, strategy, batch_size=cfg.batch_size, kl_w=cfg.loss.beta)
    return {
        "epoch": epoch,
        "loss": tr.loss,
        "recon": tr.recon,
        "kl": tr.kl,
        "kl_weight": w,
        "val_loss": va.loss,
        "val_recon": va.recon,
        "val_kl": va.kl,
        "seconds": tr.seconds + va.seconds,
        "img_per_s": tr.images / tr.seconds if tr.seconds > 0 else 0.0,
    }


def fit(run: Run, data: TrainData, callbacks: Sequence[Callback]) -> None:
    """Train from ``run.state.epoch + 1`` to ``run.cfg.epochs`` or until a callback stops the run.

    Args:
        run: the run; ``run.state`` is updated in place.
        data: device-resident data: all training images, this rank's validation share.
        callbacks: called in order after every epoch.
    """
    for cb in callbacks:
        cb.on_fit_start(run)
    try:
        for epoch in range(run.state.epoch + 1, run.cfg.epochs):
            if run.state.stopped_early:
                break
            record = _one_epoch(run, data, epoch)
            run.state.epoch = epoch
            run.state.history.append(record)
            for cb in callbacks:
                cb.on_epoch_end(run, record)
    finally:
        for cb in callbacks:
            cb.on_fit_end(run)
