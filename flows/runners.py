"""Prefect task runners from medvae's RunnerConfig: embedded, Prefect's thread/process pools, or Dask."""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from medvae.config import RunnerConfig


def task_runner(cfg: RunnerConfig) -> Any:
    """The Prefect task runner that a batched flow runs its file batches on.

    Args:
        cfg: the runner settings; ``kind`` must not be ``local`` (that runs no batches).

    Returns:
        A ``ThreadPoolTaskRunner``, ``ProcessPoolTaskRunner`` or ``prefect_dask.DaskTaskRunner``.
    """
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # A temporary cluster on this machine: one single-threaded worker process per core (decoding is
        # CPU-bound Python, so threads would share one GIL), bound to loopback.
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": ":0",  # a free port, never a clash with 8787
            }
        )
    if cfg.kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=workers)
