"""Prefect flow: train the VAE on a store version and calibrate it (thin wrapper over medvae.jobs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from medvae.config import TrainConfig, load_config, to_jsonable
from medvae.jobs import train_job


@task(name="train", retries=1, retry_delay_seconds=10, timeout_seconds=6 * 3600)
def train_task(
    store: str,
    model_dir: str,
    config: dict[str, Any],
    version: int | None,
    where: dict[str, str] | None,
    resume: bool = True,
) -> dict[str, Any]:
    """Train and calibrate; returns the model directory and its hash (never the model).

    ``resume`` defaults to on so that a Prefect retry continues from the last checkpoint.
    """
    return train_job(
        store,
        Path(model_dir),
        TrainConfig.model_validate(config),
        version=version,
        where=where,
        resume=resume and (Path(model_dir) / "checkpoint").exists(),
        progress=False,
    )


@flow(name="medvae-train", log_prints=True)
def train_flow(
    store: str,
    model_dir: str,
    config: dict[str, Any] | None = None,
    version: int | None = None,
    where: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a VAE on ``store`` and publish its figures as a Prefect table artifact."""
    cfg = to_jsonable(TrainConfig.model_validate(config or {}))
    res = train_task(store, model_dir, cfg, version, where)
    create_table_artifact(
        key="medvae-train",
        table=[{"metric": k, "value": str(v)} for k, v in res.items()],
        description=f"medvae model {res['model_hash'][:12]}",
    )
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python flows/train.py --store URI --out MODEL_DIR [--config YAML] [--set k=v] [--where k=v]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", type=int)
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    where = dict(w.split("=", 1) for w in a.where) or None
    cfg = load_config(TrainConfig, a.config, a.overrides)
    return train_flow(a.store, a.out, to_jsonable(cfg), a.version, where)


if __name__ == "__main__":
    main()
