"""Prefect flow: anomaly-screen new scans with a trained model (thin wrapper over medvae.jobs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401  (medvae's Prefect defaults, also when this file runs as a script)
from medvae.jobs import screen_job


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


@flow(name="medvae-screen", log_prints=True)
def screen_flow(
    model_dir: str, sources: list[str], out_csv: str | None = None, heatmaps: str | None = None
) -> dict[str, Any]:
    """Screen scans and publish the counts; the per-scan table is the CSV at ``out_csv``."""
    res = screen_task(model_dir, sources, out_csv, heatmaps)
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
    a = ap.parse_args(argv)
    return screen_flow(a.model, a.sources, a.out, a.heatmaps)


if __name__ == "__main__":
    main()
