"""The `medvae` command: the library's stage commands (:mod:`medvae.cli`) plus `serve`, which needs Prefect.

The library never imports its orchestration layer; this module, above both, composes the command the
console script runs. Prefect is imported only when `serve` runs, so the stage commands start fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

import flows  # noqa: F401  (medvae's Prefect defaults, before Prefect is imported)
from medvae.cli import PipelineOpt, SetOpt, app, note, run_cli
from medvae.config import load_config


@app.command()
def serve(
    config: PipelineOpt = Path("configs/pipeline.yaml"),
    set_: SetOpt = None,
    name: Annotated[
        str, typer.Option("--name", help="The deployment's name in Prefect.")
    ] = "medvae-scheduled",
    ui: Annotated[
        bool, typer.Option("--ui/--no-ui", help="Serve Prefect's web UI too (local server only).")
    ] = True,
) -> None:
    """Run the pipeline on the config's cron schedule until stopped (Ctrl-C).

    With PREFECT_API_URL set, the deployment is served against that Prefect server. Otherwise medvae
    starts and supervises its own local server (SQLite under ~/.medvae/prefect, or MEDVAE_PREFECT_HOME),
    because Prefect's temporary server has no scheduler and a deployment served on it never fires.
    """

    def body() -> None:
        from medvae.config import PipelineConfig

        cfg = load_config(PipelineConfig, config, set_)
        if os.environ.get("PREFECT_API_URL"):
            _serve(cfg, name, os.environ["PREFECT_API_URL"])
            return
        from flows.server import local_server, medvae_prefect_home

        note(f"starting a local Prefect server (database under {medvae_prefect_home()}) ...")
        with local_server(ui=ui) as api_url:
            _serve(cfg, name, api_url)

    try:
        run_cli(body)
    except KeyboardInterrupt:
        note("stopped")


def _serve(cfg: object, name: str, api_url: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from medvae.config import PipelineConfig, to_jsonable

    assert isinstance(cfg, PipelineConfig)
    os.environ["PREFECT_API_URL"] = api_url  # the flow-run subprocesses the runner starts read it
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        from flows.pipeline import pipeline_flow

        note(f"serving {name} on cron {cfg.schedule!r} against {api_url}; Ctrl-C to stop")
        # One run at a time: a run trains on the version it ingested; a run due while one is still going
        # waits for it (a deployment concurrency limit, as in prefect.yaml).
        pipeline_flow.serve(
            name=name, cron=cfg.schedule, parameters={"config": to_jsonable(cfg)}, global_limit=1
        )


def main() -> None:
    """The console script."""
    app()
