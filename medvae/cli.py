"""The `medvae` command line: one thin command per pipeline stage over the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medvae.config import IngestConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="medvae: ingest medical scans into a versioned dataset, train a VAE, make synthetic images, screen.",
)
console = Console(stderr=True)
out = Console()
_STATE: dict[str, bool] = {"debug": False}

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file for this stage.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: --set key=value (repeatable).")
]
StoreOpt = Annotated[str, typer.Option("--store", help="Store path or URI (s3://..., etc.).")]
VersionOpt = Annotated[int | None, typer.Option("--version", help="Store version; latest when omitted.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug


def run_cli(fn: Callable[[], T]) -> T:
    """Run a command body; turn expected failures into one actionable line and exit code 1.

    Tracebacks are for developers: they appear only with ``--debug``.
    """
    from pydantic import ValidationError

    from medvae.store import StoreError

    try:
        return fn()
    except typer.Exit:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = f"invalid config: {where}: {first.get('msg')} (see configs/ for valid values)"
        _fail(msg, exc)
    except (StoreError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc) or type(exc).__name__, exc)
    raise AssertionError("unreachable")


def _fail(msg: str, exc: BaseException) -> None:
    if _STATE["debug"]:
        console.print_exception()
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(1) from exc


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and not _STATE.get("force_progress", False),
    )


# ----------------------------------------------------------------------------------------------- ingest
@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Files or folders of DICOM, PNG or JPEG scans.")],
    store: StoreOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    labels_csv: Annotated[
        Path | None, typer.Option("--labels-csv", help="CSV with path,label columns (overrides folder labels).")
    ] = None,
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Do not take labels from folder names.")] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a JSON account of every input file here.")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Decoder processes (default: all cores).")] = None,
) -> None:
    """Ingest scans into a new version of the store (de-identified, 64×64, de-duplicated)."""

    def body() -> None:
        from medvae.ingest import ingest as do_ingest
        from medvae.store import Store

        overrides = list(set_ or [])
        if labels_csv is not None:
            overrides.append(f"labels_csv={labels_csv}")
        if no_labels:
            overrides.append("labels=none")
        if workers is not None:
            overrides.append(f"workers={workers}")
        cfg = load_config(IngestConfig, config, overrides)
        with _progress() as bar:
            task = bar.add_task("ingest", total=None)

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            rep = do_ingest(sources, Store(store), cfg, on_progress=tick)
        if report is not None:
            rep.write(report)
        for f in rep.files:
            if f.status == "rejected":
                console.print(f"[yellow]rejected[/] {f.path}: {f.reason}", highlight=False, markup=True)
        where = f"version {rep.version} of {store}" if rep.version is not None else f"{store} (no new version)"
        console.print(f"wrote {rep.rows_added} rows to {where}", highlight=False)
        out.print(rep.summary_line(), highlight=False)
        c = rep.counts
        if c["seen"] == 0:
            console.print("[bold red]error:[/] no files found in the given sources")
            raise typer.Exit(1)
        if c["ingested"] == 0 and c["skipped"] == 0:
            console.print("[bold red]error:[/] nothing could be ingested; see the reasons above")
            raise typer.Exit(1)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- versions
@app.command()
def versions(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the store's versions with row counts, operation and lineage."""

    def body() -> None:
        from medvae.store import Store

        hist = Store(store).history()
        if as_json:
            out.print_json(
                json.dumps(
                    [
                        {
                            "version": h.version,
                            "timestamp": h.timestamp,
                            "operation": h.operation,
                            "rows": h.rows,
                            "lineage": h.lineage,
                        }
                        for h in hist
                    ]
                )
            )
            return
        table = Table("version", "operation", "rows", "added", "git", title=f"medvae store {store}")
        prev = 0
        for h in hist:
            git = (h.lineage.get("git_commit") or "")[:10]
            table.add_row(str(h.version), h.operation, str(h.rows), f"{h.rows - prev:+d}", git)
            prev = h.rows
        out.print(table)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- export
@app.command()
def export(
    store: StoreOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Export folder (ImageFolder layout + manifest.csv).")],
    version: VersionOpt = None,
) -> None:
    """Export a version as PNG files in ImageFolder layout, plus manifest.csv."""

    def body() -> None:
        from medvae.export import export as do_export
        from medvae.store import Store

        manifest = do_export(Store(store), out_dir, version)
        out.print(f"exported to {out_dir} (manifest {manifest})", highlight=False)

    run_cli(body)


def main(argv: list[str] | None = None) -> Any:
    """Entry point for ``python -m medvae``."""
    return app(args=argv if argv is not None else sys.argv[1:])
