"""Prefect flow: synthetic images from a model, privacy-filtered, as a new store version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from medvae.config import AugmentConfig, load_config, to_jsonable
from medvae.jobs import augment_job


@task(name="augment", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def augment_task(model_dir: str, store: str, config: dict[str, Any]) -> dict[str, Any]:
    """Generate, filter and commit synthetic rows; returns counts and the new version."""
    return augment_job(Path(model_dir), store, AugmentConfig.model_validate(config))


@flow(name="medvae-augment", log_prints=True)
def augment_flow(model_dir: str, store: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Augment ``store`` with synthetic images and publish the privacy-filter figures."""
    res = augment_task(model_dir, store, to_jsonable(AugmentConfig.model_validate(config or {})))
    create_table_artifact(
        key="medvae-augment",
        table=[{"metric": k, "value": str(v)} for k, v in res.items()],
        description="medvae synthetic images and privacy filter",
    )
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python flows/augment.py --model MODEL_DIR --store URI [--count N] [--label L] [--set k=v]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--count", type=int)
    ap.add_argument("--label")
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    extra = [f"count={a.count}"] if a.count is not None else []
    extra += [f"label={a.label}"] if a.label else []
    cfg = load_config(AugmentConfig, a.config, a.overrides + extra)
    return augment_flow(a.model, a.store, to_jsonable(cfg))


if __name__ == "__main__":
    main()
