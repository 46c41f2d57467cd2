"""Prefect flow: ingest folders of scans into a new store version (thin wrapper over medvae.ingest)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from medvae.config import IngestConfig, load_config, to_jsonable
from medvae.ingest import ingest, report_dict
from medvae.store import Store


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(
    sources: list[str], store: str, config: dict[str, Any], report: str | None = None
) -> dict[str, Any]:
    """Ingest ``sources`` into ``store``; returns counts and the new version (never pixels)."""
    rep = ingest([Path(s) for s in sources], Store(store), IngestConfig.model_validate(config))
    if report:
        rep.write(Path(report))
    return report_dict(rep)


@flow(name="medvae-ingest", log_prints=True)
def ingest_flow(
    sources: list[str], store: str, config: dict[str, Any] | None = None, report: str | None = None
) -> dict[str, Any]:
    """Ingest scans into a versioned store and publish the counts as a Prefect table artifact."""
    cfg = to_jsonable(IngestConfig.model_validate(config or {}))
    summary = ingest_task(sources, store, cfg, report)
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
    """``python flows/ingest.py SOURCE... --store URI [--config YAML] [--set k=v] [--report FILE]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--store", required=True)
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--report")
    a = ap.parse_args(argv)
    cfg = load_config(IngestConfig, a.config, a.overrides)
    return ingest_flow(a.sources, a.store, to_jsonable(cfg), a.report)


if __name__ == "__main__":
    main()
