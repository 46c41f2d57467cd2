"""Where and how training runs: the device, autocast, the memory format and BatchNorm synchronisation."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

DeviceRequest = Literal["auto", "cpu", "cuda"]
SyncBatchNorm = Literal["auto", "on", "off"]


def select_device(requested: DeviceRequest | str) -> torch.device:
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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: bf16 on GPUs that support it, None (fp32) otherwise.

    bf16 has fp32's exponent range, so no loss scaling is needed. CPUs train in fp32: CPU bf16 speed
    depends on the chip (AMX or not; the dev box's Zen 1 has neither AMX nor AVX-512) and it changes
    the numerics.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for forward passes on ``device`` (a no-op when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_channels_last(device: torch.device) -> bool:
    """Whether the model and its batches use the channels-last memory format on ``device``.

    channels_last lets oneDNN (CPU) and cuDNN (GPU) run the convolutions and BatchNorm without layout
    reorders; on the 2-core dev box it was the largest fp32 CPU gain (benchmarks/train_throughput.py).
    """
    return device.type in ("cpu", "cuda")


def use_sync_batchnorm(mode: SyncBatchNorm, device: torch.device) -> bool:
    """Whether BatchNorm statistics are synchronised across processes.

    ``auto`` is on for CUDA (torch's fused SyncBatchNorm over NCCL) and off elsewhere. torch's
    SyncBatchNorm has CUDA kernels only; per-process BatchNorm on the CPU was measured as good
    (docs/distributed_training.md), so ``on`` with a CPU device is refused rather than emulated.

    Raises:
        ValueError: for ``on`` with a device other than CUDA.
    """
    if mode == "auto":
        return device.type == "cuda"
    if mode == "on" and device.type != "cuda":
        raise ValueError(
            f"sync_batchnorm=on needs CUDA (torch's SyncBatchNorm has no {device.type} kernels); "
            "set sync_batchnorm=auto or off to train on the CPU with per-process BatchNorm"
        )
    return mode == "on"


def configure_backends(device: torch.device) -> None:
    """Backend switches for fixed-shape training on ``device``.

    cuDNN's per-shape algorithm search pays off after the first batch because every step has the
    same shapes (a last, smaller batch costs one more search).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
