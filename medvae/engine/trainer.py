"""``train_vae``: the VAE trained on a tensor-resident dataset, in one process or under torchrun."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvae.config import TrainConfig
from medvae.engine.callbacks import Checkpointer, ModelSelection, ProgressBar
from medvae.engine.checkpoint import CHECKPOINT_NAME, check_resumable, load_checkpoint
from medvae.engine.data import ArrayLike, TrainData, prepare_data, seed_everything, to_device
from medvae.engine.device import configure_backends
from medvae.engine.loop import Callback, Engine, Run, TrainState, build_engine, clone_state, fit
from medvae.engine.strategy import Strategy, per_rank_batch, shard_epoch, strategy_for
from medvae.vae.model import ConvVAE


@dataclass
class TrainResult:
    """The outcome of :func:`train_vae`.

    Attributes:
        model: the best-validation model: a plain ConvVAE in eval mode on the training device (call
            ``.cpu()`` to move it); never a DDP or ``torch.compile`` wrapper.
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


def _resume(path: Path, run: Run, n_train: int, n_val: int) -> None:
    # Rank 0 reads the checkpoint and sends it to the others: on several nodes only rank 0's filesystem
    # is sure to hold it, and a rank that started afresh while rank 0 resumed would hang the others.
    ckpt = run.strategy.on_main(lambda: load_checkpoint(path) if path.exists() else None)
    if ckpt is None:
        return  # nothing written yet: start from scratch
    check_resumable(ckpt, path, run.cfg, n_train, n_val)
    run.engine.model.load_state_dict(ckpt["model"])
    run.engine.optimizer.load_state_dict(ckpt["optimizer"])
    run.state = TrainState.from_checkpoint(ckpt)


def step_budget(cfg: TrainConfig, n_train: int, world_size: int = 1) -> tuple[TrainConfig, int]:
    """``cfg`` with its epochs raised to reach ``cfg.step_floor`` optimiser steps, and the epoch count
    before which early stopping may not end the run.

    Args:
        cfg: the training configuration.
        n_train: training images.
        world_size: processes (a step is one global batch, :func:`~medvae.engine.strategy.shard_epoch`).

    Returns:
        ``(cfg, min_epochs)``; ``cfg`` unchanged and 0 when there is no step floor.
    """
    floor = cfg.step_floor
    if floor == 0:
        return cfg, 0
    steps = len(shard_epoch(torch.arange(n_train), cfg.batch_size, 0, world_size)[1])
    min_epochs = math.ceil(floor / max(steps, 1))
    return cfg.model_copy(update={"epochs": max(cfg.epochs, min_epochs)}), min_epochs


def _best_model(cfg: TrainConfig, engine: Engine, state: TrainState) -> ConvVAE:
    # A fresh plain ConvVAE, whatever the training layers were (SyncBatchNorm, DDP): what scoring and
    # the model directory expect, with the same state-dict keys.
    model = ConvVAE(cfg.model).to(engine.device)
    if engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(state.best_state)
    return model.eval()


def _builtin_callbacks(
    run: Run, host: TrainData, checkpoint_dir: Path | None, resume: bool, progress: bool, min_epochs: int
) -> list[Callback]:
    # Selection first: the checkpoint records its state. A resume loads into ``run`` before fitting.
    cfg = run.cfg
    selection = ModelSelection(cfg.patience, cfg.loss.kl_warmup_epochs, cfg.epochs, min_epochs)
    builtin: list[Callback] = [selection]
    if checkpoint_dir is not None:
        path = checkpoint_dir / CHECKPOINT_NAME
        if resume:
            _resume(path, run, host.n_train, host.n_val)
        builtin.append(Checkpointer(path, host.n_train, host.n_val))
    builtin.append(ProgressBar(progress))
    return builtin


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
    callbacks: Sequence[Callback] = (),
    strategy: Strategy | None = None,
) -> TrainResult:
    """Train the (conditional) VAE with validation, early stopping and optional checkpoints.

    The uint8 data is moved to the device once; batches are gathered and converted to float there.
    On CUDA the forward pass runs under bf16 autocast; the model and batches use the channels-last
    layout; ``cfg.compile`` wraps the model in ``torch.compile``.

    Validation runs after every epoch in eval mode (z = μ) with the KL weight fixed at ``beta`` so
    that epochs compare during the KL warm-up; selection and early stopping follow
    :class:`~medvae.engine.callbacks.ModelSelection`, and the best epoch's weights are returned. A step
    floor (``cfg.min_steps``; :func:`step_budget`) raises the epochs and delays early stopping.

    With ``checkpoint_dir``, ``checkpoint.pt`` is rewritten atomically after every epoch (by rank 0).
    ``resume=True`` continues after its last completed epoch, or starts afresh when there is none.
    Every epoch reseeds its random streams from (seed, epoch, rank), so on the CPU a resumed run is
    bit-identical to an uninterrupted one at the same number of processes; a checkpoint also resumes
    at any other number (with other random streams).

    Inside a process group of several processes (torchrun; :mod:`medvae.engine.strategy`) it trains
    with DistributedDataParallel at the global batch ``cfg.batch_size``; the history and every
    decision are global and identical on all ranks, and every rank returns the same model.

    Args:
        images: uint8 training images (N, H, W) or (N, 1, H, W), H = W = ``cfg.model.image_size``.
        labels: integer class indices (N,); required for a conditional VAE, ignored otherwise.
        cfg: the training configuration (seed, device, model, loss, ...).
        val_images: uint8 validation images (normally the store's patient-grouped val split); when
            None, a seeded random ``cfg.val_fraction`` of ``images`` is held out (not patient-grouped).
        val_labels: class indices of ``val_images`` (conditional VAE only).
        checkpoint_dir: where to write ``checkpoint.pt``; created if missing.
        resume: continue from ``checkpoint_dir/checkpoint.pt``.
        progress: show a rich progress bar over epochs (rank 0).
        callbacks: more callbacks, called after the built-in selection, checkpoint and progress ones.
        strategy: how ranks train together; default :func:`~medvae.engine.strategy.strategy_for`
            ``(cfg.device)`` (torchrun's group when there is one, else one process).

    Returns:
        The best model with the per-epoch history.

    Raises:
        ValueError: for inconsistent data, missing labels of a conditional VAE, a batch that does not
            split over the processes, ``sync_batchnorm=on`` without CUDA, or a checkpoint made with
            another configuration or dataset size.
        RuntimeError: when CUDA is requested but absent, or the training loss becomes non-finite.
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    strategy = strategy or strategy_for(cfg.device)
    host = prepare_data(images, labels, cfg, val_images, val_labels)
    per_rank_batch(cfg.batch_size, strategy.world_size, host.n_train)
    configure_backends(strategy.device)
    data = to_device(host, strategy.device, strategy.shard_range(host.n_val))

    cfg, min_epochs = step_budget(cfg, host.n_train, strategy.world_size)
    seed_everything(cfg.seed)
    engine = build_engine(cfg, strategy)
    run = Run(cfg, engine, strategy, TrainState(best_state=clone_state(engine.model)))
    builtin = _builtin_callbacks(run, host, checkpoint_dir, resume, progress, min_epochs)
    fit(run, data, [*builtin, *callbacks])
    return TrainResult(
        model=_best_model(cfg, engine, run.state),
        history=copy.deepcopy(run.state.history),
        best_epoch=run.state.best_epoch,
        stopped_early=run.state.stopped_early,
        device=strategy.device.type,
    )
