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

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

WATCH_INTERVAL = 0.5  # seconds between two looks at the parent pid
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LIMITS: list[Any] = []  # keeps the worker's threadpool limits alive for its whole life
_ARMED: list[int] = []  # the parent pid, once this worker's guards are armed


def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers exit when this process dies, all started now.

    Every worker is started here, from the calling thread, so that start-up is paid once and the
    parent-death signal is tied to this thread (see the module docstring). The workers do not re-run the
    parent's ``__main__`` script (multiprocessing would otherwise import the whole command line in each).

    Args:
        workers: the number of worker processes.
        initializer: run once in each worker after the guards are armed (must be picklable: a
            module-level function).
        initargs: its arguments, pickled once per worker.

    Returns:
        The executor; use it as a context manager, from the thread that created it.
    """
    n = max(1, workers)
    pool = ProcessPoolExecutor(
        max_workers=n,
        mp_context=mp.get_context("spawn"),
        initializer=_start_worker,
        # The guard is unpickled first, so the guards are armed before the initializer's module (and
        # everything it imports) loads.
        initargs=(_Guard(os.getpid()), initializer, initargs),
    )
    with _without_main_script():
        # Each submit starts one worker while none is idle: n of them start all n, here and now.
        warm = [pool.submit(_ready) for _ in range(n)]
    for f in warm:
        f.result()
    return pool


@contextlib.contextmanager
def _without_main_script() -> Iterator[None]:
    """Hide ``__main__`` from multiprocessing while workers are spawned.

    A spawned child re-runs the parent's main script (``bin/medvae``, which imports the whole CLI:
    typer, rich, pydantic) unless the main module is a package's ``__main__``. medvae's workers need
    nothing from it: everything they run is importable by name.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _ready() -> bool:
    return True


class _Guard:
    """Arms the parent-death guards in a worker as soon as it is unpickled there (see process_pool)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> tuple[Callable[[int], _Guard], tuple[int]]:
        return _arm, (self.parent,)


def _arm(parent: int) -> _Guard:
    """Unpickling a :class:`_Guard` in a worker: PR_SET_PDEATHSIG, then the watchdog thread."""
    if not _ARMED:
        _ARMED.append(parent)
        _set_parent_death_signal()
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)
        watch = threading.Thread(
            target=_watch_parent, args=(parent,), name="medvae-parent-watch", daemon=True
        )
        watch.start()
    return _Guard(parent)


def die_with_parent() -> None:
    """Arm this process's parent-death guards: it exits within about a second of its parent's death.

    For a process that medvae did not start itself, e.g. the flow-run subprocess Prefect's runner spawns
    for each scheduled run: killed with ``medvae serve`` (SIGKILL, the OOM killer), the runner cannot
    stop it, and it was measured still training minutes later.
    """
    _arm(os.getppid())


def _start_worker(guard: _Guard, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Pin BLAS to one thread for the worker's life, then run the caller's initializer."""
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
