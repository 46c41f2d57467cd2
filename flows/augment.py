"""Prefect flow: synthetic images from a model, privacy-filtered, as a new store version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults)
from medvae.config import AugmentConfig
from medvae.jobs.augment import augment_job
from medvae.jobs.results import AugmentResult


@task(name="augment", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def augment_task(model_dir: str, store: str, cfg: AugmentConfig) -> AugmentResult:
    """Generate, filter and commit synthetic rows; returns counts and the new version."""
    return augment_job(Path(model_dir), store, cfg)


@flow(name="medvae-augment", log_prints=True)
def augment_flow(model_dir: str, store: str, config: dict[str, Any] | None = None) -> AugmentResult:
    """Augment ``store`` with synthetic images and publish the privacy-filter figures."""
    res = augment_task(model_dir, store, AugmentConfig.model_validate(config or {}))
    create_table_artifact(
        key="medvae-augment",
        table=[{"metric": k, "value": str(v)} for k, v in res.to_dict().items()],
        description="medvae synthetic images and privacy filter",
    )
    return res
