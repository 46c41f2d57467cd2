"""How ranks train together: one process (:class:`Local`) or torchrun's DDP (:class:`Torchrun`).

The loop in :mod:`medvae.engine.loop` has one code path. A strategy supplies what differs between one
process and several: this rank's place (``rank``, ``world_size``, ``device``), its share of an epoch
(``shard``) and of the validation set (``shard_range``), a sum over ranks (``all_reduce``), work that
only rank 0 does (``on_main``), the model wrapper (``wrap``), and ``barrier``/``teardown``. ``Local``
is the identity; ``Torchrun`` is a thin layer over ``torch.distributed`` and DDP. Another launcher
(Lightning Fabric, say) fits by subclassing :class:`Strategy`.

Launch several processes with ``torchrun --nproc_per_node N -m medvae.train ...`` or
``medvae train --nproc N``; see ``docs/distributed_training.md``. Importing this needs torch only.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medvae.engine.device import select_device

T = TypeVar("T")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by torchrun), 1 when absent or empty."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def env_rank() -> int:
    """``RANK`` from the environment (set by torchrun), 0 when absent or empty."""
    return int(os.environ.get("RANK") or 0)


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


def shard_epoch(order: Tensor, batch_size: int, rank: int, world_size: int) -> tuple[Tensor, list[int]]:
    """Rank ``rank``'s training indices for one epoch and the size of each of its steps.

    Global step ``k`` is the batch ``order[k*B:(k+1)*B]``; rank ``r`` takes the ``r``-th of its
    ``world_size`` equal slices. The last, partial global batch of ``rem`` images is split the same
    way into slices of ``rem // world_size``, kept when that is at least 2 (BatchNorm's minimum), so
    every rank runs the same number of equal-sized steps (a rank with one step fewer would leave the
    others waiting in the gradient all-reduce) and the mean of the ranks' mean gradients is the mean
    gradient of the global batch. Up to ``world_size - 1`` images of that batch sit out the epoch. With
    one process this is plain batching that drops only a last batch of one image.

    Args:
        order: the epoch's permutation of the training indices, identical on every rank.
        batch_size: the global batch size (divisible by ``world_size``, see :func:`per_rank_batch`).
        rank: this rank.
        world_size: the number of ranks.

    Returns:
        This rank's indices in step order (int64, on ``order``'s device) and the size of each step.
    """
    b = batch_size // world_size
    n = order.numel()
    full = n // batch_size
    parts = [order[: full * batch_size].view(full, world_size, b)[:, rank, :].reshape(-1)]
    steps = [b] * full
    tail = (n - full * batch_size) // world_size
    if tail >= 2:
        start = full * batch_size
        parts.append(order[start : start + tail * world_size].view(world_size, tail)[rank])
        steps.append(tail)
    return torch.cat(parts), steps


class Strategy(abc.ABC):
    """One rank's view of a training run; see the module docstring.

    Attributes:
        rank: this process's rank, 0 .. world_size - 1; rank 0 alone writes files.
        world_size: the number of processes training together.
        device: where this rank trains.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one process that writes checkpoints and shows progress."""
        return self.rank == 0

    def shard(self, order: Tensor, batch_size: int) -> tuple[Tensor, list[int]]:
        """This rank's indices of an epoch's permutation and its step sizes (:func:`shard_epoch`)."""
        return shard_epoch(order, batch_size, self.rank, self.world_size)

    def shard_range(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (validation); shares differ by at most one."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    @abc.abstractmethod
    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks in place and return it."""

    @abc.abstractmethod
    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its (picklable) result on every rank."""

    @abc.abstractmethod
    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """The module that training calls: ``model`` itself, or a wrapper that averages gradients."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait until every rank gets here."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Leave the process group (after a successful run)."""


class Local(Strategy):
    """One process: every collective is the identity."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world_size, self.device = 0, 1, device

    def all_reduce(self, t: Tensor) -> Tensor:
        """``t`` itself: the sum over one rank."""
        return t

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()``: this process is rank 0."""
        return fn()

    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """``model`` itself: one process's BatchNorm already sees the whole batch."""
        return model

    def barrier(self) -> None:
        """Nothing to wait for."""

    def teardown(self) -> None:
        """Nothing to leave."""


class Torchrun(Strategy):
    """DistributedDataParallel over the default process group (torchrun's, or one the caller made).

    Each rank trains on ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo).
    """

    def __init__(self, requested_device: str) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK") or self.rank)
        self.device = select_device(requested_device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", _local_gpu(self.local_rank))
            torch.cuda.set_device(self.device)
        elif dist.get_backend() == "nccl":
            raise RuntimeError(
                "the process group uses NCCL, which needs CUDA tensors, but training runs on the CPU: "
                "initialise it with the gloo backend or train with device=cuda"
            )

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` (on the backend's device) over the ranks in place and return it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and broadcast its result; an error on rank 0 stops every rank.

        Rank 0 re-raises its own exception; the others raise ``RuntimeError("rank 0 failed: ...")``, so
        that a failed write (a full disk) does not leave them waiting in the next collective.
        """
        error: Exception | None = None
        status: tuple[bool, object] = (True, None)
        if self.is_main:
            try:
                status = (True, fn())
            except Exception as exc:
                error, status = exc, (False, f"{type(exc).__name__}: {exc}")
        box: list[object] = [status]
        dist.broadcast_object_list(box, src=0)
        ok, payload = cast(tuple[bool, object], box[0])
        if error is not None:
            raise error
        if not ok:
            raise RuntimeError(f"rank 0 failed: {payload}")
        return cast(T, payload)

    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """DDP around ``model``, with torch's SyncBatchNorm first when asked (CUDA only).

        The converted layers share the BatchNorm parameters and buffers, so ``model``'s state-dict keys
        do not change. DDP does not rebroadcast buffers before every forward (a collective per step);
        the loop averages BatchNorm statistics once per epoch instead.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # torch 2.15 deprecates broadcast_buffers, with a warning, in favour of forward_sync_buffers.
        new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_sync: dict[str, Any] = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        return DDP(model, device_ids=ids, **no_sync)

    def barrier(self) -> None:
        """``torch.distributed.barrier()``."""
        dist.barrier()

    def teardown(self) -> None:
        """Barrier, collect, destroy: no rank still has traffic in flight when the group goes.

        (Once in about 30 test runs a gloo rank aborted at exit, "terminate called without an active
        exception", after finishing its work; these are the usual remedies, the cause was not found.)
        """
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def _local_gpu(local_rank: int) -> int:
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: {n} visible on this node; launch at most one process "
            "per GPU (--nproc_per_node)"
        )
    return local_rank


def strategy_for(requested_device: str) -> Strategy:
    """:class:`Torchrun` inside an initialised process group of several processes, else :class:`Local`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Torchrun(requested_device)
    return Local(select_device(requested_device))


@contextlib.contextmanager
def session(requested_device: str) -> Iterator[Strategy]:
    """Join torchrun's process group for the duration of a training job and yield the strategy.

    With ``WORLD_SIZE`` <= 1 (or a group the caller initialised) nothing is initialised and it yields
    :func:`strategy_for`. Under torchrun it initialises the group from the environment (``env://``)
    with NCCL on CUDA, after binding this process to ``cuda:LOCAL_RANK``, or gloo on the CPU, and
    tears it down when the job succeeds. After an error the group is left alone: another rank may
    still be inside a collective, and torchrun stops the other ranks.

    Args:
        requested_device: the configured device, ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Yields:
        This process's strategy.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        yield strategy_for(requested_device)
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    cuda = select_device(requested_device).type == "cuda"
    if cuda:
        torch.cuda.set_device(_local_gpu(int(os.environ.get("LOCAL_RANK") or 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    strategy = Torchrun(requested_device)
    yield strategy
    strategy.teardown()


def on_main(fn: Callable[[], T], strategy: Strategy) -> T:
    """``strategy.on_main(fn)``: run ``fn`` on rank 0 only and give its result to every rank."""
    return strategy.on_main(fn)


def average_buffers(model: nn.Module, strategy: Strategy) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    With per-rank BatchNorm each rank's running statistics follow its own shard; their average is the
    estimate over all the data, and afterwards every rank holds the same model, so validation and the
    checkpoint agree. In one process (or with synchronised BatchNorm) it changes nothing: the sum
    over one rank divided by one is exact. Integer buffers (``num_batches_tracked``) are left alone.
    """
    floats = [b for b in model.buffers() if b.is_floating_point()]
    if not floats:
        return
    flat = strategy.all_reduce(torch.cat([b.detach().reshape(-1).float() for b in floats]))
    flat.div_(strategy.world_size)
    offset = 0
    with torch.no_grad():
        for b in floats:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def torchrun_command(nproc: int, train_args: Sequence[str]) -> list[str]:
    """The torchrun command line that :func:`launch` runs: one node, ``nproc`` processes.

    ``--standalone`` lets torchrun pick a free local rendezvous port, so several jobs can share a
    machine.
    """
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*run, "-m", "medvae.train", *train_args]


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
