"""Prefect flow: anomaly-screen new scans with a trained model (thin wrapper over medvae.jobs)."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from flows.runners import task_runner
from medvae.config import RunnerConfig, load_config, to_jsonable
from medvae.data.staging import staging_uri
from medvae.jobs import merge_screen, prepare_screen_batches, screen_batch, screen_job


@task(name="screen", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def screen_task(
    model_dir: str, sources: list[str], out_csv: str | None, heatmaps: str | None
) -> dict[str, Any]:
    """Score the scans under ``sources``; returns counts (the per-scan figures go to the CSV)."""
    res = screen_job(
        Path(model_dir),
        [Path(s) for s in sources],
        out_csv=Path(out_csv) if out_csv else None,
        heatmaps_dir=Path(heatmaps) if heatmaps else None,
    )
    return {k: res[k] for k in ("scored", "rejected", "flagged")}


@task(name="screen-plan", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def screen_plan_task(sources: list[str], staging: str, batch_files: int) -> dict[str, Any]:
    """Walk the sources and stage the file batches."""
    return prepare_screen_batches([Path(s) for s in sources], staging, batch_files)


@task(name="screen-batch", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def screen_batch_task(model_dir: str, staging: str, index: int, heatmaps: bool) -> dict[str, Any]:
    """Score one staged batch on whichever worker runs it."""
    return screen_batch(Path(model_dir), staging, index, heatmaps)


@task(name="screen-merge", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def screen_merge_task(staging: str, out_csv: str | None, heatmaps: str | None) -> dict[str, Any]:
    """Merge the batches into the one CSV and heat-map folder; returns counts."""
    res = merge_screen(staging, Path(out_csv) if out_csv else None, Path(heatmaps) if heatmaps else None)
    return {k: res[k] for k in ("scored", "rejected", "flagged")}


@flow(name="medvae-screen-batches", log_prints=True)
def screen_batches_flow(
    model_dir: str,
    sources: list[str],
    out_csv: str | None,
    heatmaps: str | None,
    staging_base: str,
    batch_files: int,
) -> dict[str, Any]:
    """Plan, score file batches on this flow's task runner, and merge once."""
    staging = staging_uri(staging_base, uuid.uuid4().hex[:16])
    plan = screen_plan_task(sources, staging, batch_files)
    indices = list(range(plan["batches"]))
    done = screen_batch_task.map(
        unmapped(model_dir), unmapped(staging), indices, unmapped(heatmaps is not None)
    ).result()
    print(f"scored {sum(b['scored'] for b in done)} scans in {len(done)} batches")
    return screen_merge_task(staging, out_csv, heatmaps)


@flow(name="medvae-screen", log_prints=True)
def screen_flow(
    model_dir: str,
    sources: list[str],
    out_csv: str | None = None,
    heatmaps: str | None = None,
    runner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Screen scans and publish the counts; the per-scan table is the CSV at ``out_csv``.

    With a ``runner`` other than ``local``, the files are scored in batches on that Prefect task runner
    (the model directory and the scans must be readable by its workers); the CSV and heat maps are the
    same as the embedded run's. The batches stage their output in ``_medvae/staging`` beside the model
    directory.
    """
    rc = RunnerConfig.model_validate(runner or {})
    if rc.kind == "local":
        res = screen_task(model_dir, sources, out_csv, heatmaps)
    else:
        batched = screen_batches_flow.with_options(task_runner=task_runner(rc))
        res = batched(model_dir, sources, out_csv, heatmaps, str(Path(model_dir).parent), rc.batch_files)
    create_table_artifact(
        key="medvae-screen",
        table=[{"metric": k, "value": v} for k, v in res.items()],
        description=f"medvae screening; per-scan scores in {out_csv}",
    )
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python flows/screen.py --model MODEL_DIR SOURCE... [--out scores.csv] [--heatmaps DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--heatmaps")
    ap.add_argument("--runner", action="append", default=[], help="e.g. kind=dask, address=tcp://h:8786")
    a = ap.parse_args(argv)
    rc = load_config(RunnerConfig, None, a.runner)
    return screen_flow(a.model, a.sources, a.out, a.heatmaps, to_jsonable(rc))


if __name__ == "__main__":
    main()
