"""Multi-process (DDP) training: torchrun's process group, per-epoch data shards, BatchNorm sync, rank-0 I/O.

Nothing here runs unless the process is one of several: ``WORLD_SIZE`` greater than 1 in the environment
(``torchrun``) or a process group that the caller initialised itself. One process trains exactly as it
did before this module existed. Importing it needs torch only (no Prefect).

Launch with ``torchrun --nproc_per_node N -m medvae.train ...`` or ``medvae train --nproc N``; see
``docs/distributed_training.md``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
SyncBatchNormMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in an initialised process group of more than one process.

    Attributes:
        rank: the global rank, 0 .. world_size - 1; rank 0 alone writes files.
        local_rank: the rank on this node (torchrun's ``LOCAL_RANK``); picks the GPU ``cuda:local_rank``.
        world_size: the number of processes.
        backend: the process group backend, ``"nccl"`` (CUDA) or ``"gloo"`` (CPU).
    """

    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one process that writes checkpoints and model directories."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by torchrun), 1 when absent or empty."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def env_rank() -> int:
    """``RANK`` from the environment (set by torchrun), 0 when absent or empty."""
    return int(os.environ.get("RANK") or 0)


def current() -> DistContext | None:
    """The process group this process is part of, or None when it trains alone.

    Returns:
        The context when ``torch.distributed`` is initialised with more than one process, else None
        (including a group of one, which trains exactly like a plain single process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK") or rank)
    return DistContext(rank=rank, local_rank=local, world_size=world, backend=str(dist.get_backend()))


def _device_type(requested: str) -> str:
    # Mirrors medvae.engine.trainer.select_device without importing it (training imports this module). A
    # "cuda" request without a GPU gets gloo here and select_device's clear error a moment later.
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


@contextlib.contextmanager
def session(requested_device: str) -> Iterator[DistContext | None]:
    """Join torchrun's process group for the duration of a training job.

    With ``WORLD_SIZE`` <= 1 this does nothing and yields :func:`current` (None unless the caller set up
    a group itself, e.g. with ``torch.multiprocessing.spawn``). Under torchrun it initialises the group
    from the environment (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) with
    NCCL when training on CUDA, after binding this process to ``cuda:LOCAL_RANK``, and gloo on the CPU;
    the group is destroyed when the job succeeds (after an error the process exits and torchrun stops
    the other ranks).

    Args:
        requested_device: the configured device, ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Yields:
        The distributed context, or None when training in one process.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        yield current()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "gloo"
    if _device_type(requested_device) == "cuda":
        backend = "nccl"
        local = int(os.environ.get("LOCAL_RANK") or 0)
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} has no GPU: {torch.cuda.device_count()} visible on this node; "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    yield current()
    # Only after success: with an exception in flight another rank may still be inside a collective,
    # and tearing the group down under it can hang; torchrun stops the other ranks instead. The
    # barrier makes sure no rank still has traffic in flight, and the collection frees Python objects
    # that may hold work of the group while the interpreter is whole. (Once in about 30 test runs, a
    # gloo rank aborted at exit, "terminate called without an active exception", after finishing its
    # work; the cause was not pinned down and these are the usual remedies for it.)
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def training_device(ctx: DistContext, device_type: str) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` on GPUs, else the CPU.

    Args:
        ctx: the distributed context.
        device_type: ``"cuda"`` or ``"cpu"``, as resolved by ``select_device``.

    Returns:
        The device, made current for CUDA.

    Raises:
        RuntimeError: when this rank has no GPU of its own, or NCCL is asked to train on the CPU.
    """
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if ctx.local_rank >= n:
            raise RuntimeError(
                f"local rank {ctx.local_rank} has no GPU: {n} visible on this node; launch at most one "
                "process per GPU (--nproc_per_node)"
            )
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
        return dev
    if ctx.backend == "nccl":
        raise RuntimeError(
            "the process group uses NCCL, which needs CUDA tensors, but training runs on the CPU: "
            "initialise it with the gloo backend or train with device=cuda"
        )
    return torch.device("cpu")


def per_rank_batch(batch_size: int, world_size: int, n_train: int | None = None) -> int:
    """Images per process per step when the global batch ``batch_size`` is split over ``world_size``.

    The global batch stays ``batch_size`` so that DDP's gradient averaging optimises what one process
    does with the same configuration.

    Args:
        batch_size: the configured (global) batch size.
        world_size: the number of processes.
        n_train: the number of training images, to check that every rank gets a step.

    Returns:
        ``batch_size // world_size``.

    Raises:
        ValueError: when the batch does not divide evenly, leaves fewer than 2 images per process
            (BatchNorm cannot normalise a batch of one), or there are too few training images.
    """
    if batch_size % world_size:
        lo = batch_size - batch_size % world_size
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must be divisible by the {world_size} "
            f"processes; use e.g. batch_size={lo or world_size * 2} or {lo + world_size}"
        )
    b = batch_size // world_size
    if b < 2:
        raise ValueError(
            f"batch_size {batch_size} over {world_size} processes leaves {b} image per process and step; "
            f"BatchNorm needs at least 2: use batch_size >= {2 * world_size} or fewer processes"
        )
    if n_train is not None and n_train // world_size < 2:
        raise ValueError(
            f"{n_train} training images are too few for {world_size} processes: each needs at least 2"
        )
    return b


def epoch_shard(order: Tensor, batch_size: int, ctx: DistContext) -> tuple[Tensor, list[int]]:
    """This rank's training indices for one epoch and the size of each of its steps.

    Global step ``k`` is the same batch one process would take, ``order[k*B:(k+1)*B]``; rank ``r``
    takes the ``r``-th of its ``world_size`` equal slices. The last, partial global batch of ``rem``
    images is split the same way into slices of ``rem // world_size`` (kept when that is at least 2,
    BatchNorm's minimum), so every rank runs the same number of equal-sized steps (a rank that ran one
    step fewer would leave the others waiting in the gradient all-reduce) and the average of the
    ranks' mean gradients is the mean gradient of the global batch. Up to ``world_size - 1`` images
    of that last batch sit out the epoch; the shuffle changes which ones.

    Args:
        order: the epoch's permutation of the training indices, identical on every rank.
        batch_size: the global batch size (divisible by the world size, see :func:`per_rank_batch`).
        ctx: the distributed context.

    Returns:
        This rank's indices in step order (a CPU int64 tensor) and the size of each step.
    """
    w, r = ctx.world_size, ctx.rank
    b = batch_size // w
    n = order.numel()
    full = n // batch_size
    parts = [order[: full * batch_size].view(full, w, b)[:, r, :].reshape(-1)]
    steps = [b] * full
    tail = (n - full * batch_size) // w
    if tail >= 2:
        start = full * batch_size
        parts.append(order[start : start + tail * w].view(w, tail)[r])
        steps.append(tail)
    return torch.cat(parts), steps


def shard_slice(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous share of ``n`` items (validation): sizes differ by at most one."""
    return slice(n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size)


def rank_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A seed derived from (seed, epoch, rank, stream) only.

    Ranks draw their reparameterisation noise (``stream`` 0) and augmentation (``stream`` 1) from
    generators reseeded by this at every epoch: ranks do not repeat each other's draws, and a resumed
    run at the same world size draws exactly what the uninterrupted one did.
    """
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + stream * 15_485_863 + 31) % 2**63


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (it must live on the backend's device) and return it."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    With plain per-rank BatchNorm each rank's running statistics follow its own shard; their average
    is the estimate over all the data, and after it every rank holds the same model, so validation and
    the checkpoint agree. With synchronised BatchNorm they are already equal and this changes nothing.
    Integer buffers (``num_batches_tracked``) are equal on every rank and left alone.
    """
    floats = [b for b in model.buffers() if b.is_floating_point()]
    if not floats:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in floats])
    all_reduce_sum(flat).div_(ctx.world_size)
    offset = 0
    with torch.no_grad():
        for b in floats:
            k = b.numel()
            b.copy_(flat[offset : offset + k].view_as(b))
            offset += k


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the others' argument is ignored)."""
    box: list[object] = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; the others wait for it.

    An exception on rank 0 is re-raised there and raised as a RuntimeError with its message on every
    other rank, so that a failed write (a full disk) stops all ranks instead of leaving them waiting in
    the next collective.

    Args:
        fn: the work, e.g. writing a checkpoint; its result must be picklable.
        ctx: the distributed context.

    Returns:
        ``fn()``'s result, on every rank.
    """
    error: BaseException | None = None
    status: tuple[bool, object]
    if ctx.is_main:
        try:
            status = (True, fn())
        except Exception as exc:
            error = exc
            status = (False, f"{type(exc).__name__}: {exc}")
    else:
        status = (True, None)
    ok, payload = broadcast_object(status, ctx)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed: {payload}")
    return payload  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- BatchNorm
class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the global batch, forward and backward, with one all-reduce each way.

    The same algebra as torch's CUDA SyncBatchNorm, on native CPU kernels: the forward merges the
    ranks' per-channel (mean, M2, count) exactly (Chan's parallel variance) and normalises with the
    fused eval-mode batch-norm kernel; the backward gets each rank's sums of dy and dy * x̂ from the
    fused batch-norm backward kernel, all-reduces them, and forms the input gradient from the global
    means. Weight and bias gradients stay local: DistributedDataParallel averages them like any other.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Any:
        c = x.shape[1]
        n = x.numel() // c
        world, rank = dist.get_world_size(), dist.get_rank()
        # This rank's per-channel mean and 1/sqrt(var + eps) from the fused training-mode kernel: ten
        # times faster than var_mean over (N, H, W) on a channels-last CPU tensor (measured).
        _, mean_r, invstd_r = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        var_r = (invstd_r.double().reciprocal().square() - eps).clamp_min(0.0).float()
        # An all-gather as the sum of one-row tables: the plain all-reduce, which every backend has.
        table = x.new_zeros((world, 2 * c + 1), dtype=torch.float32)
        table[rank, :c] = mean_r
        table[rank, c : 2 * c] = var_r * n
        table[rank, 2 * c] = n
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        means, m2s, counts = table[:, :c], table[:, c : 2 * c], table[:, 2 * c : 2 * c + 1]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = (m2s.sum(0) + ((means - mean).square() * counts).sum(0)) / total
        invstd = torch.rsqrt(var + eps)
        y = nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.total = eps, float(total)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, total

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Any) -> Any:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        w = weight if weight is not None else torch.ones_like(mean)
        # Local sums of dy * x̂ (as the weight gradient) and dy (as the bias gradient), one fused pass.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        mean_dy, mean_dy_xhat = sums[:c] / ctx.total, sums[c:] / ctx.total
        # dx = (dy - mean(dy) - x̂ * mean(dy x̂)) * invstd * w, as a per-channel a * dy + b * x + k.
        a = invstd * w
        b = -invstd * a * mean_dy_xhat
        k = -a * mean_dy - b * mean
        shape = (1, c, 1, 1)
        dx = dy * a.view(shape)
        dx.addcmul_(x, b.view(shape)).add_(k.view(shape))
        return (
            dx,
            sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None,
            sum_dy if ctx.needs_input_grad[2] else None,
            None,
        )


class HostSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch on every backend, CPU included.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (its kernels exist for CUDA only, torch 2.15 too).
    This one computes the same thing with native CPU kernels and gloo (:class:`_SyncBatchNormFn`), so
    forward and backward equal BatchNorm over the global batch. In eval mode, or outside a process
    group of more than one, it is plain BatchNorm2d. Its parameters and buffers are BatchNorm2d's, so
    state-dict keys do not change.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if dist.get_world_size() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()  # the statistics and the CPU kernels in float32, as autocast-free CPU training
        y, mean, var, total = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                # Unbiased variance for the running estimate, as BatchNorm2d keeps it.
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(input.dtype)


def convert_host_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by :class:`HostSyncBatchNorm`, in place.

    The new layers take over the old parameters and buffers (the same tensors), so an optimizer built
    before the conversion keeps working and the state-dict keys do not change.

    Returns:
        ``module`` (converted in place; a bare BatchNorm2d is returned converted).
    """
    if type(module) is nn.BatchNorm2d:
        new = HostSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_host_sync_batchnorm(child))
    return module


def use_sync_batchnorm(mode: SyncBatchNormMode, device: torch.device) -> bool:
    """Whether BatchNorm is synchronised across processes.

    ``auto`` is on for CUDA (torch's fused SyncBatchNorm; per-GPU batches are where plain BatchNorm
    statistics get small) and off on the CPU, where the measurement in docs/distributed_training.md
    found plain per-process BatchNorm as good and faster.
    """
    if mode == "auto":
        return device.type == "cuda"
    return mode == "on"


def prepare_model(model: nn.Module, device: torch.device, mode: SyncBatchNormMode) -> nn.Module:
    """Convert the model's BatchNorm layers for synchronised statistics when ``mode`` says so.

    CUDA uses ``torch.nn.SyncBatchNorm``; other devices :class:`HostSyncBatchNorm`. Both keep the
    parameters, buffers and state-dict keys of the plain model.

    Returns:
        The same model object, converted in place.
    """
    if not use_sync_batchnorm(mode, device):
        return model
    if device.type == "cuda":
        out = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        out = convert_host_sync_batchnorm(model)
    if out is not model:  # only a bare BatchNorm root would be replaced; ConvVAE never is
        raise TypeError("prepare_model expects a model that contains BatchNorm layers, not one")
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel for ``device``.

    No buffer broadcast before every forward: with per-rank BatchNorm, rebroadcasting rank 0's running
    statistics would cost a collective per step; :func:`average_buffers` reconciles them once per
    epoch instead.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # Newer torch (2.15 here) deprecates broadcast_buffers, with a warning, for forward_sync_buffers.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    return DDP(model, device_ids=ids, broadcast_buffers=False)


# ----------------------------------------------------------------------------------------- launching
def torchrun_command(nproc: int, train_args: Sequence[str]) -> list[str]:
    """The torchrun command line that :func:`launch` runs: one node, ``nproc`` processes.

    ``--standalone`` lets torchrun pick a free local rendezvous port, so several jobs can run on one
    machine at once.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "medvae.train",
        *train_args,
    ]


def launch(nproc: int, train_args: Sequence[str]) -> int:
    """Run ``medvae.train`` under torchrun with ``nproc`` processes on this machine and wait for it.

    Args:
        nproc: processes (one per GPU on CUDA).
        train_args: the ``medvae train`` options (``--store``, ``--out``, ...), without ``--nproc``.

    Returns:
        torchrun's exit code (0 when every rank succeeded).
    """
    if env_world_size() > 1:
        raise RuntimeError("already running under torchrun (WORLD_SIZE > 1): do not pass --nproc here")
    return subprocess.run(torchrun_command(nproc, train_args), check=False).returncode
