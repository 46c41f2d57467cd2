"""Prefect flow: train the VAE on a store version and calibrate it (one call into medvae)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults)
from medvae.config import TrainConfig
from medvae.jobs.results import TrainedModel
from medvae.jobs.train import Where, train_job


@task(name="train", retries=1, retry_delay_seconds=10, timeout_seconds=6 * 3600)
def train_task(
    store: str,
    model_dir: str,
    cfg: TrainConfig,
    version: int | None,
    where: Where | None,
    resume: bool = True,
) -> TrainedModel:
    """Train and calibrate; returns the model directory and its hash (never the model).

    ``resume`` defaults to on so that a Prefect retry continues from the last checkpoint.
    """
    resume = resume and (Path(model_dir) / "checkpoint").exists()
    return train_job(store, Path(model_dir), cfg, version=version, where=where, resume=resume, progress=False)


@flow(name="medvae-train", log_prints=True)
def train_flow(
    store: str,
    model_dir: str,
    config: dict[str, Any] | None = None,
    version: int | None = None,
    where: dict[str, str | list[str]] | None = None,
) -> TrainedModel:
    """Train a VAE on ``store`` and publish its figures as a Prefect table artifact."""
    res = train_task(store, model_dir, TrainConfig.model_validate(config or {}), version, where)
    create_table_artifact(
        key="medvae-train",
        table=[{"metric": k, "value": str(v)} for k, v in res.to_dict().items()],
        description=f"medvae model {res.model_hash[:12]}",
    )
    return res
