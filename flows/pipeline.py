"""Prefect flow: ingest → train → augment → screen, written back as one new store version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from flows.ingest import run_ingest
from flows.train import train_task
from medvae.config import AugmentConfig, PipelineConfig, load_config, to_jsonable
from medvae.data.store import lineage
from medvae.jobs import commit_pipeline, generate_synthetic, pictures_job, score_store_rows, stage


@task(name="synthesise", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def synthesise_task(model_dir: str, store: str, config: dict[str, Any], staging: str) -> dict[str, Any]:
    """Sample and privacy-filter synthetic rows into a staging Parquet file; returns its path and figures."""
    rows, stats = generate_synthetic(Path(model_dir), store, AugmentConfig.model_validate(config))
    return {**stats, "path": stage(rows, Path(staging) / "synthetic.parquet")}


@task(name="score", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def score_task(model_dir: str, store: str, version: int | None, staging: str) -> dict[str, Any]:
    """Score every real row of ``version`` into a staging Parquet file; returns its path and counts."""
    rows = score_store_rows(Path(model_dir), store, version)
    flags = rows.column("anomaly_flag").to_pylist()
    return {
        "path": stage(rows, Path(staging) / "scores.parquet"),
        "scored": rows.num_rows,
        "flagged": sum(bool(f) for f in flags),
    }


@task(name="commit", retries=2, retry_delay_seconds=5, timeout_seconds=3600)
def commit_task(store: str, parts: list[str], meta: dict[str, Any]) -> int:
    """Commit the staged synthetic rows and scores as exactly one new version."""
    return commit_pipeline(store, [Path(p) for p in parts], meta)


@task(name="pictures", retries=1, retry_delay_seconds=5, timeout_seconds=900)
def pictures_task(model_dir: str, store: str) -> list[str]:
    """Reconstruction, sample and interpolation grids for the run's model."""
    return pictures_job(Path(model_dir), store, Path(model_dir) / "pictures")


@flow(name="medvae-pipeline", log_prints=True, timeout_seconds=12 * 3600)
def pipeline_flow(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scheduled job: ingest new scans, retrain, synthesise, screen, and write one new version."""
    cfg = PipelineConfig.model_validate(config or {})
    ing = run_ingest(
        [str(s) for s in cfg.sources], cfg.store, to_jsonable(cfg.ingest), None, to_jsonable(cfg.runner)
    )
    print(f"ingest: ingested {ing['ingested']}, rejected {ing['rejected']}, skipped {ing['skipped']}")
    trained = train_task(
        cfg.store, str(cfg.model_dir), to_jsonable(cfg.train), None, cfg.train_where or None, resume=False
    )
    print(
        f"train: model {trained['model_hash'][:12]} on {trained['device']}, "
        f"best epoch {trained['best_epoch']}"
    )
    staging = str(cfg.model_dir.parent / "staging" / trained["model_hash"][:16])
    syn = synthesise_task(trained["model_dir"], cfg.store, to_jsonable(cfg.augment), staging)
    print(
        f"augment: kept {syn['kept']} of {syn['requested']} "
        f"(privacy rejection rate {syn['rejection_rate']:.1%})"
    )
    scored = score_task(trained["model_dir"], cfg.store, trained["dataset_version"], staging)
    print(f"screen: scored {scored['scored']} real scans, flagged {scored['flagged']}")
    meta = lineage(
        "pipeline",
        to_jsonable(cfg),
        model_hash=trained["model_hash"],
        ingest=ing,
        train={k: v for k, v in trained.items() if k != "model_dir"},
        privacy={k: v for k, v in syn.items() if k != "path"},
        screen={k: v for k, v in scored.items() if k != "path"},
    )
    version = commit_task(cfg.store, [syn["path"], scored["path"]], meta)
    pictures = pictures_task(trained["model_dir"], cfg.store)
    summary = {
        "version": version,
        "model_hash": trained["model_hash"],
        "ingested": ing["ingested"],
        "synthetic_rows": syn["kept"],
        "privacy_rejection_rate": syn["rejection_rate"],
        "scored": scored["scored"],
        "flagged": scored["flagged"],
        "val_loss": trained["val_loss"],
        "threshold": trained["threshold"],
    }
    create_table_artifact(
        key="medvae-pipeline",
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        description="medvae pipeline run",
    )
    create_markdown_artifact(
        key="medvae-pictures",
        markdown="\n".join(f"- [{Path(p).name}]({Path(p).resolve().as_uri()})" for p in pictures),
        description="image grids of this run's model",
    )
    print(f"pipeline: wrote version {version} of {cfg.store}")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python flows/pipeline.py [--config configs/pipeline.yaml] [--set k=v]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/pipeline.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    cfg = load_config(PipelineConfig, a.config, a.overrides)
    res = pipeline_flow(to_jsonable(cfg))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
