"""Prefect flow: ingest folders of scans into a new store version (thin wrapper over medvae.data.ingest)."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from flows.runners import task_runner
from medvae.config import IngestConfig, RunnerConfig, load_config, to_jsonable
from medvae.data.ingest import commit_batches, decode_batch, ingest, prepare_batches, report_dict
from medvae.data.staging import staging_uri
from medvae.data.store import Store


@task(name="ingest", retries=1, retry_delay_seconds=5, timeout_seconds=6 * 3600)
def ingest_task(
    sources: list[str], store: str, config: dict[str, Any], report: str | None = None
) -> dict[str, Any]:
    """Ingest ``sources`` into ``store``; returns counts and the new version (never pixels)."""
    rep = ingest([Path(s) for s in sources], Store(store), IngestConfig.model_validate(config))
    if report:
        rep.write(Path(report))
    return report_dict(rep)


@task(name="ingest-plan", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def plan_task(
    sources: list[str], store: str, config: dict[str, Any], staging: str, batch_files: int
) -> dict[str, Any]:
    """Walk the sources and stage the file batches; returns the staging path and the batch count."""
    cfg = IngestConfig.model_validate(config)
    return prepare_batches([Path(s) for s in sources], Store(store), cfg, staging, batch_files)


@task(name="ingest-batch", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def batch_task(staging: str, index: int, store: str, config: dict[str, Any]) -> dict[str, Any]:
    """Decode one staged batch on whichever worker runs it; returns its counts."""
    return decode_batch(staging, index, Store(store), IngestConfig.model_validate(config))


@task(name="ingest-commit", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def commit_task(staging: str, store: str, config: dict[str, Any], report: str | None) -> dict[str, Any]:
    """Commit every decoded batch as one new version; returns counts and the version."""
    rep = commit_batches(staging, Store(store), IngestConfig.model_validate(config))
    if report:
        rep.write(Path(report))
    return report_dict(rep)


@flow(name="medvae-ingest-batches", log_prints=True)
def ingest_batches_flow(
    sources: list[str], store: str, config: dict[str, Any], report: str | None, batch_files: int
) -> dict[str, Any]:
    """Plan, decode file batches on this flow's task runner, and commit once."""
    staging = staging_uri(store, uuid.uuid4().hex[:16])
    plan = plan_task(sources, store, config, staging, batch_files)
    indices = list(range(plan["batches"]))
    batches = batch_task.map(unmapped(staging), indices, unmapped(store), unmapped(config))
    done = batches.result()  # raises if a batch failed after its retries: nothing is committed then
    print(f"decoded {sum(b['files'] for b in done)} files in {len(done)} batches")
    return commit_task(staging, store, config, report)


def run_ingest(
    sources: list[str], store: str, config: dict[str, Any], report: str | None, runner: dict[str, Any] | None
) -> dict[str, Any]:
    """Ingest inside a flow: one embedded task by default, file batches on a task runner otherwise."""
    rc = RunnerConfig.model_validate(runner or {})
    if rc.kind == "local":
        return ingest_task(sources, store, config, report)
    batched = ingest_batches_flow.with_options(task_runner=task_runner(rc))
    return batched(sources, store, config, report, rc.batch_files)


@flow(name="medvae-ingest", log_prints=True)
def ingest_flow(
    sources: list[str],
    store: str,
    config: dict[str, Any] | None = None,
    report: str | None = None,
    runner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest scans into a versioned store and publish the counts as a Prefect table artifact."""
    cfg = to_jsonable(IngestConfig.model_validate(config or {}))
    summary = run_ingest(sources, store, cfg, report, runner)
    create_table_artifact(
        key="medvae-ingest",
        table=[{"metric": k, "value": v} for k, v in summary.items()],
        description=f"medvae ingest into {store}",
    )
    print(
        f"ingested {summary['ingested']}, rejected {summary['rejected']}, skipped {summary['skipped']}"
        f" -> version {summary['version']}"
    )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python flows/ingest.py SOURCE... --store URI [--config YAML] [--set k=v] [--runner k=v]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--store", required=True)
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runner", action="append", default=[], help="e.g. kind=dask, address=tcp://h:8786")
    ap.add_argument("--report")
    a = ap.parse_args(argv)
    cfg = load_config(IngestConfig, a.config, a.overrides)
    rc = load_config(RunnerConfig, None, a.runner)
    return ingest_flow(a.sources, a.store, to_jsonable(cfg), a.report, to_jsonable(rc))


if __name__ == "__main__":
    main()
