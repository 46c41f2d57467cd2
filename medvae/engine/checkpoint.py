"""Training checkpoints: an atomic, fsynced write and a ``weights_only`` load that checks what it read."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvae.config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "medvae-train-checkpoint"
CHECKPOINT_VERSION = 1
# Settings that may change between an interrupted run and its resumption without changing the result of
# the epochs already done: more epochs, a different patience, another device, compilation on or off,
# BatchNorm synchronisation (it only acts with several processes). The number of processes is not part
# of the configuration at all: a checkpoint resumes at any world size (docs/distributed_training.md).
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "compile", "sync_batchnorm"})


def resumable_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of ``cfg`` that a resumed run must share with the checkpoint, as plain JSON types."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}


def make_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    selection: dict[str, Any],
    cfg: TrainConfig,
    *,
    n_train: int,
    n_val: int,
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint dict: weights, optimizer, selection state and what a resume is checked against.

    Nothing in it depends on the number of processes (``world_size`` is informative): the unwrapped
    model's state has plain BatchNorm keys, the optimizer covers the same parameters in the same
    order and the history is global. There is no RNG state: every epoch reseeds its random streams
    from (seed, epoch, rank), so a resumed run draws what an uninterrupted one does.

    Args:
        model: the unwrapped model (no DDP or ``torch.compile`` prefixes in its keys).
        optimizer: its optimizer.
        selection: ``TrainState.to_checkpoint()``: epoch, history, best weights and early-stopping state.
        cfg: the training configuration.
        n_train: training images.
        n_val: validation images.
        world_size: processes that trained it.

    Returns:
        A dict of tensors and plain data (loadable with ``weights_only=True``).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **selection,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": resumable_config(cfg),
        "n_train": n_train,
        "n_val": n_val,
        "world_size": world_size,
    }


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` atomically: beside it, fsync, rename, fsync the directory.

    A crash leaves either the old or the new checkpoint, never a torn one, and no temporary file.
    """
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
        path: a ``checkpoint.pt`` written by :func:`medvae.engine.trainer.train_vae`.
        map_location: where to put its tensors.

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: with a one-line message naming ``path`` when it is not a medvae training checkpoint
            (not a torch file, a pickle with code in it, another format or version).
        FileNotFoundError: when there is no file.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # a missing or unreadable file is not a question of format
    except Exception:  # torch raises UnpicklingError, KeyError, EOFError, RuntimeError... for foreign bytes
        # torch's own message is a page long and suggests weights_only=False, which is the hazard; a
        # pickle with code in it and random bytes fail the same way (an unsupported opcode), so one text.
        raise ValueError(
            f"{path} is not a medvae training checkpoint: not a torch file of tensors and plain data "
            "(refused unread by torch.load(weights_only=True))"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medvae training checkpoint (no medvae format marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: Path, cfg: TrainConfig, n_train: int, n_val: int) -> None:
    """Refuse to resume ``ckpt`` with another configuration or dataset size.

    Raises:
        ValueError: naming ``path`` and what differs.
    """
    if ckpt["config"] != resumable_config(cfg):
        raise ValueError(
            f"{path} was written with a different configuration; only "
            f"{sorted(RESUMABLE_CHANGES)} may change when resuming"
        )
    if (ckpt["n_train"], ckpt["n_val"]) != (n_train, n_val):
        raise ValueError(
            f"{path} was written for {ckpt['n_train']} train / {ckpt['n_val']} val images, "
            f"not {n_train} / {n_val}"
        )
