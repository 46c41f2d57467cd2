"""Prefect flow: the pipeline of :func:`medvae.jobs.pipeline.run_pipeline`, each stage a Prefect task.

The stages and their order are written once, in medvae; this flow only runs each of them as a task
with retries and a timeout, and publishes the run's figures as artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults)
from flows.ingest import run_ingest
from flows.train import train_task
from medvae.config import PipelineConfig
from medvae.jobs.pipeline import Steps, run_pipeline
from medvae.jobs.results import AugmentResult, IngestSummary, PipelineResult, ScoredRows, TrainedModel

# Set by `medvae serve` for the flow-run subprocesses its runner starts (flows.cli).
SERVED_ENV = "MEDVAE_SERVED_BY_PID"

LOCAL = Steps()


@task(name="synthesise", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def synthesise_task(cfg: PipelineConfig, trained: TrainedModel, staging: str) -> AugmentResult:
    """Sample and privacy-filter synthetic rows into a staging Parquet file."""
    return LOCAL.synthesise(cfg, trained, Path(staging))


@task(name="score", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def score_task(cfg: PipelineConfig, trained: TrainedModel, staging: str) -> ScoredRows:
    """Score every real row of the trained-on version into a staging Parquet file."""
    return LOCAL.score(cfg, trained, Path(staging))


@task(name="commit", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def commit_task(cfg: PipelineConfig, parts: list[str], meta: dict[str, Any]) -> int:
    """Commit the staged synthetic rows and scores as exactly one new version."""
    return LOCAL.commit(cfg, parts, meta)


@task(name="pictures", retries=1, retry_delay_seconds=5, timeout_seconds=900)
def pictures_task(cfg: PipelineConfig, trained: TrainedModel) -> list[str]:
    """Synthetic sample grids of the run's model."""
    return LOCAL.pictures(cfg, trained)


class PrefectSteps(Steps):
    """Every pipeline stage as a Prefect task; ingest on the configured task runner."""

    def ingest(self, cfg: PipelineConfig) -> IngestSummary:
        return run_ingest([str(s) for s in cfg.sources], cfg.store, cfg.ingest, None, cfg.runner)

    def train(self, cfg: PipelineConfig) -> TrainedModel:
        # No resume across runs: every scheduled run retrains on the newest version.
        return train_task(
            cfg.store, str(cfg.model_dir), cfg.train, None, cfg.train_where or None, resume=False
        )

    def synthesise(self, cfg: PipelineConfig, trained: TrainedModel, staging: Path) -> AugmentResult:
        return synthesise_task(cfg, trained, str(staging))

    def score(self, cfg: PipelineConfig, trained: TrainedModel, staging: Path) -> ScoredRows:
        return score_task(cfg, trained, str(staging))

    def commit(self, cfg: PipelineConfig, parts: list[str], meta: dict[str, Any]) -> int:
        return commit_task(cfg, parts, meta)

    def pictures(self, cfg: PipelineConfig, trained: TrainedModel) -> list[str]:
        return pictures_task(cfg, trained)


@flow(name="medvae-pipeline", log_prints=True, timeout_seconds=12 * 3600)
def pipeline_flow(config: dict[str, Any] | None = None) -> PipelineResult:
    """The scheduled job: ingest new scans, retrain, synthesise, screen, and write one new version."""
    if os.environ.get(SERVED_ENV):
        # A flow-run subprocess of `medvae serve`'s runner: it must not outlive the runner.
        from medvae._pool import die_with_parent

        die_with_parent()
    res = run_pipeline(PipelineConfig.model_validate(config or {}), PrefectSteps())
    create_table_artifact(
        key="medvae-pipeline",
        table=[{"metric": k, "value": str(v)} for k, v in res.to_dict().items() if k != "pictures"],
        description="medvae pipeline run",
    )
    create_markdown_artifact(
        key="medvae-pictures",
        markdown="\n".join(f"- [{Path(p).name}]({Path(p).resolve().as_uri()})" for p in res.pictures),
        description="synthetic sample grids of this run's model",
    )
    return res
