"""Prefect flow: ingest folders of scans into a new store version (each task is one call into medvae)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults)
from flows.runners import task_runner
from medvae.config import IngestConfig, RunnerConfig
from medvae.data.ingest import commit_batches, decode_batch, ingest, prepare_batches
from medvae.data.staging import staging_uri
from medvae.data.store import Store
from medvae.jobs.results import IngestSummary


def _finish(report: Any, path: str | None) -> IngestSummary:
    if path:
        report.write(Path(path))
    return IngestSummary.of(report)


@task(name="ingest", retries=1, retry_delay_seconds=5, timeout_seconds=6 * 3600)
def ingest_task(
    sources: list[str], store: str, cfg: IngestConfig, report: str | None = None
) -> IngestSummary:
    """Ingest ``sources`` into ``store`` in this process (its own decoder pool); returns the counts."""
    return _finish(ingest([Path(s) for s in sources], Store(store), cfg), report)


@task(name="ingest-plan", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def plan_task(sources: list[str], store: str, cfg: IngestConfig, staging: str, batch_files: int) -> int:
    """Walk the sources and stage the file batches; returns the batch count."""
    return int(
        prepare_batches([Path(s) for s in sources], Store(store), cfg, staging, batch_files)["batches"]
    )


@task(name="ingest-batch", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def batch_task(staging: str, index: int, store: str, cfg: IngestConfig) -> int:
    """Decode one staged batch on whichever worker runs it; returns its file count."""
    return int(decode_batch(staging, index, Store(store), cfg)["files"])


@task(name="ingest-commit", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def commit_task(staging: str, store: str, cfg: IngestConfig, report: str | None) -> IngestSummary:
    """Commit every decoded batch as one new version."""
    return _finish(commit_batches(staging, Store(store), cfg), report)


@flow(name="medvae-ingest-batches", log_prints=True)
def ingest_batches_flow(
    sources: list[str], store: str, cfg: IngestConfig, report: str | None, batch_files: int
) -> IngestSummary:
    """Plan, decode file batches on this flow's task runner, and commit once."""
    staging = staging_uri(store, uuid.uuid4().hex[:16])
    batches = plan_task(sources, store, cfg, staging, batch_files)
    futures = batch_task.map(unmapped(staging), list(range(batches)), unmapped(store), unmapped(cfg))
    files = futures.result()  # raises if a batch failed after its retries: nothing is committed then
    print(f"decoded {sum(files)} files in {len(files)} batches")
    return commit_task(staging, store, cfg, report)


def run_ingest(
    sources: list[str], store: str, cfg: IngestConfig, report: str | None, runner: RunnerConfig
) -> IngestSummary:
    """Ingest inside a flow: one embedded task by default, file batches on a task runner otherwise."""
    if runner.kind == "local":
        return ingest_task(sources, store, cfg, report)
    batched = ingest_batches_flow.with_options(task_runner=task_runner(runner))
    return batched(sources, store, cfg, report, runner.batch_files)


@flow(name="medvae-ingest", log_prints=True)
def ingest_flow(
    sources: list[str],
    store: str,
    config: dict[str, Any] | None = None,
    report: str | None = None,
    runner: dict[str, Any] | None = None,
) -> IngestSummary:
    """Ingest scans into a versioned store and publish the counts as a Prefect table artifact."""
    cfg, rc = IngestConfig.model_validate(config or {}), RunnerConfig.model_validate(runner or {})
    summary = run_ingest(sources, store, cfg, report, rc)
    create_table_artifact(
        key="medvae-ingest",
        table=[{"metric": k, "value": v} for k, v in summary.to_dict().items()],
        description=f"medvae ingest into {store}",
    )
    print(f"{summary.line()} -> version {summary.version}")
    return summary
