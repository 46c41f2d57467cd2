"""Prefect flow: anomaly-screen new scans with a trained model (each task is one call into medvae)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults)
from flows.runners import task_runner
from medvae.config import RunnerConfig, ScreenConfig
from medvae.data.staging import staging_uri
from medvae.jobs.screen import (
    merge_screen,
    model_threshold_warnings,
    prepare_screen_batches,
    screen_batch,
    screen_job,
)


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


@task(name="screen", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def screen_task(
    model_dir: str, sources: list[str], out_csv: str | None, heatmaps: str | None, cfg: ScreenConfig
) -> dict[str, int]:
    """Score the scans under ``sources``; returns counts (the per-scan figures go to the CSV)."""
    res = screen_job(
        Path(model_dir),
        [Path(s) for s in sources],
        out_csv=_path(out_csv),
        heatmaps_dir=_path(heatmaps),
        cfg=cfg,
    )
    return res.counts()


@task(name="screen-plan", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def screen_plan_task(sources: list[str], staging: str, batch_files: int) -> int:
    """Walk the sources and stage the file batches; returns the batch count."""
    return prepare_screen_batches([Path(s) for s in sources], staging, batch_files)


@task(name="screen-batch", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def screen_batch_task(model_dir: str, staging: str, index: int, heatmaps: bool, cfg: ScreenConfig) -> int:
    """Score one staged batch on whichever worker runs it; returns how many it scored."""
    return screen_batch(Path(model_dir), staging, index, heatmaps, cfg)


@task(name="screen-merge", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def screen_merge_task(staging: str, out_csv: str | None, heatmaps: str | None) -> dict[str, int]:
    """Merge the batches into the one CSV and heat-map folder; returns counts."""
    return merge_screen(staging, _path(out_csv), _path(heatmaps)).counts()


@flow(name="medvae-screen-batches", log_prints=True)
def screen_batches_flow(
    model_dir: str,
    sources: list[str],
    out_csv: str | None,
    heatmaps: str | None,
    cfg: ScreenConfig,
    batch_files: int,
) -> dict[str, int]:
    """Plan, score file batches on this flow's task runner, and merge once.

    The batches stage their output in ``_medvae/staging`` beside the model directory.
    """
    staging = staging_uri(str(Path(model_dir).parent), uuid.uuid4().hex[:16])
    batches = screen_plan_task(sources, staging, batch_files)
    done = screen_batch_task.map(
        unmapped(model_dir),
        unmapped(staging),
        list(range(batches)),
        unmapped(heatmaps is not None),
        unmapped(cfg),
    ).result()
    print(f"scored {sum(done)} scans in {len(done)} batches")
    return screen_merge_task(staging, out_csv, heatmaps)


@flow(name="medvae-screen", log_prints=True)
def screen_flow(
    model_dir: str,
    sources: list[str],
    out_csv: str | None = None,
    heatmaps: str | None = None,
    runner: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Screen scans and publish the counts; the per-scan table is the CSV at ``out_csv``.

    With a ``runner`` other than ``local`` the files are scored in batches on that Prefect task runner
    (the model directory and the scans must be readable by its workers); the CSV and heat maps are the
    same as the embedded run's.
    """
    rc, cfg = RunnerConfig.model_validate(runner or {}), ScreenConfig.model_validate(config or {})
    if rc.kind == "local":
        res = screen_task(model_dir, sources, out_csv, heatmaps, cfg)
    else:
        batched = screen_batches_flow.with_options(task_runner=task_runner(rc))
        res = batched(model_dir, sources, out_csv, heatmaps, cfg, rc.batch_files)
    create_table_artifact(
        key="medvae-screen",
        table=[{"metric": k, "value": v} for k, v in res.items()],
        description=f"medvae screening; per-scan scores in {out_csv}",
    )
    for warning in model_threshold_warnings(Path(model_dir), cfg, res):
        print(f"warning: {warning}")
    print(f"scored {res['scored']}, flagged {res['flagged']}, rejected {res['rejected']}")
    return res
