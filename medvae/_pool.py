"""The one process-pool factory of medvae: spawned workers that never outlive their parent.

A ``ProcessPoolExecutor`` worker waits on its call queue, a pipe whose write end every spawned worker also
holds, so when the parent dies (SIGKILL, the OOM killer, a crash) no worker ever sees end-of-file: the
workers of a killed ``medvae ingest`` were measured still alive 44 minutes later, holding memory and the
source files open. Every medvae pool is made here, and its workers end themselves within about a second
of the parent's death, however it died:

* on Linux the kernel sends them SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``, through
  ctypes; it fires when the *thread* that started the worker ends, so a pool must be created and used
  from one thread, as a ``with`` block does);
* everywhere, a daemon thread in each worker compares ``os.getppid()`` with the parent's pid every
  :data:`WATCH_INTERVAL` seconds and calls ``os._exit`` when the parent is gone (the worker has been
  re-parented). That also covers a PR_SET_PDEATHSIG that could not be set.

Workers are spawned, never forked: the parent may hold threads (Prefect, torch, rich's progress bar) that
fork would copy mid-lock. Each worker pins BLAS/OpenMP to one thread for its whole life: parallelism comes
from the processes, one per core, and multi-threaded BLAS inside each would oversubscribe the cores
(spinning BLAS threads made a 0.2 ms resize take 10 ms).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

WATCH_INTERVAL = 0.5  # seconds between two looks at the parent pid
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LIMITS: list[Any] = []  # keeps the worker's threadpool limits alive for its whole life


def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers exit when this process dies.

    Args:
        workers: the number of worker processes.
        initializer: run once in each worker after the watchdog is armed (must be picklable: a
            module-level function).
        initargs: its arguments, pickled once per worker.

    Returns:
        The executor; use it as a context manager, from the thread that created it.
    """
    return ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=mp.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Arm the parent-death guards, pin BLAS to one thread, then run the caller's initializer."""
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died while this worker was starting
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="medvae-parent-watch", daemon=True).start()
    from threadpoolctl import threadpool_limits

    _LIMITS.append(threadpool_limits(1))
    if initializer is not None:
        initializer(*initargs)


def _watch_parent(parent: int) -> None:
    """Exit this worker as soon as its parent is gone (it is then re-parented to init or a subreaper)."""
    stop = threading.Event()
    while not stop.wait(WATCH_INTERVAL):
        if os.getppid() != parent:
            os._exit(1)  # no clean-up: the parent that would collect the results no longer exists


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
