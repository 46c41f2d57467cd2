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
    """Run the pipeline on the config's cron schedule until stopped (Ctrl-C or SIGTERM).

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

    code = 0
    try:
        run_cli(body)
    except KeyboardInterrupt:
        note("stopped")
    except SystemExit as exc:  # Prefect's runner answers SIGTERM with sys.exit(0) after stopping
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        note("stopped")
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the process now that serving has stopped (and the local server is down).

    Prefect's log and event workers are threads that keep retrying the API at interpreter exit: after a
    SIGTERM (systemd, docker stop) the process was measured still alive, retrying a stopped server,
    indefinitely. Everything medvae writes is committed before a run finishes, so nothing is lost.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(cfg: object, name: str, api_url: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from medvae.config import PipelineConfig, to_jsonable

    assert isinstance(cfg, PipelineConfig)
    os.environ["PREFECT_API_URL"] = api_url  # the flow-run subprocesses the runner starts read it
    from flows.pipeline import SERVED_ENV

    os.environ[SERVED_ENV] = str(os.getpid())  # ... and this: they end when the runner dies
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
