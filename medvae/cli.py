"""The `medvae` command line: one thin command per pipeline stage over the library."""

from __future__ import annotations

import errno
import json
import logging
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
# Pillow's DEBUG records print decoded EXIF/TIFF tag values (Artist, ImageDescription ...): PHI in the logs
# of anyone running with DEBUG logging (e.g. PREFECT_LOGGING_ROOT_LEVEL=DEBUG). Never below INFO for it.
logging.getLogger("PIL").setLevel(logging.INFO)

console = Console(stderr=True)
out = Console()
_STATE: dict[str, bool] = {"debug": False}

T = TypeVar("T")
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})  # full disk, or over quota

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

    from medvae.data.store import StoreError

    try:
        return fn()
    except typer.Exit:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = f"invalid config: {where}: {first.get('msg')} (see configs/ for valid values)"
        _fail(msg, exc)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            # "[Errno 28] No space left on device" alone does not say where or what to do about it.
            where = f" while writing {exc.filename}" if exc.filename else ""
            _fail(
                f"the disk is full (no space left on device){where}: free some disk space or point "
                "--out/--store at a disk with more room, then run the command again",
                exc,
            )
        _fail(str(exc) or type(exc).__name__, exc)
    except (StoreError, ValueError, RuntimeError) as exc:
        _fail(str(exc) or type(exc).__name__, exc)
    raise AssertionError("unreachable")


def _fail(msg: str, exc: BaseException) -> None:
    if _STATE["debug"]:
        console.print_exception()
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
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
        Path | None,
        typer.Option("--labels-csv", help="CSV with path,label columns (overrides folder labels)."),
    ] = None,
    no_labels: Annotated[
        bool, typer.Option("--no-labels", help="Do not take labels from folder names.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a JSON account of every input file here.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoder processes (default: all cores).")
    ] = None,
) -> None:
    """Ingest scans into a new version of the store (de-identified, 64×64, de-duplicated)."""

    def body() -> None:
        from medvae.data.ingest import ingest as do_ingest
        from medvae.data.store import Store

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
                console.print(f"[yellow]rejected[/] {f.path}: {f.reason}", highlight=False, soft_wrap=True)
        where = (
            f"version {rep.version} of {store}" if rep.version is not None else f"{store} (no new version)"
        )
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
        from medvae.data.store import Store

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
    out_dir: Annotated[
        Path, typer.Option("--out", help="Export folder (ImageFolder layout + manifest.csv).")
    ],
    version: VersionOpt = None,
) -> None:
    """Export a version as PNG files in ImageFolder layout, plus manifest.csv."""

    def body() -> None:
        from medvae.data.export import export as do_export
        from medvae.data.store import Store

        manifest = do_export(Store(store), out_dir, version)
        out.print(f"exported to {out_dir} (manifest {manifest})", highlight=False)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- train
def _where(pairs: list[str] | None) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--where {p!r} must look like column=value (e.g. label=normal)")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out or None


@app.command()
def train(
    store: StoreOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    version: VersionOpt = None,
    where: Annotated[
        list[str] | None,
        typer.Option("--where", help="Row filter column=value, e.g. label=normal (repeatable)."),
    ] = None,
    conditional: Annotated[
        bool, typer.Option("--conditional", help="Train a label-conditional VAE.")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the model directory's checkpoint.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Training processes on this machine (one per GPU on CUDA): more than 1 runs "
            "`torchrun -m medvae.train` with DistributedDataParallel; batch_size stays the global batch. "
            "See docs/distributed_training.md (multi-node: call torchrun directly).",
        ),
    ] = 1,
) -> None:
    """Train the VAE on a store version, calibrate its anomaly threshold, and write a model directory."""

    def body() -> None:
        from medvae.config import TrainConfig
        from medvae.engine import strategy as distributed
        from medvae.jobs import train_job

        overrides = list(set_ or [])
        if conditional:
            overrides.append("model.conditional=true")
        if device:
            overrides.append(f"device={device}")
        if epochs:
            overrides.append(f"epochs={epochs}")
        cfg = load_config(TrainConfig, config, overrides)
        if nproc > 1:
            # Fail here, in one line, rather than in every rank after torchrun has started them.
            distributed.per_rank_batch(cfg.batch_size, nproc)
            args = ["--store", store, "--out", str(out_dir)]
            args += ["--version", str(version)] if version is not None else []
            args += [a for w in where or [] for a in ("--where", w)]
            args += ["--conditional"] * conditional + ["--resume"] * resume
            args += ["--device", device] if device else []
            args += ["--epochs", str(epochs)] if epochs else []
            args += ["--config", str(config)] if config is not None else []
            args += [a for o in set_ or [] for a in ("--set", o)]
            code = distributed.launch(nproc, ["--debug", *args] if _STATE["debug"] else args)
            if code != 0:
                raise RuntimeError(
                    f"distributed training failed (torchrun exited with code {code}); "
                    "the ranks' errors are printed above"
                )
            return
        res = train_job(
            store,
            out_dir,
            cfg,
            version=version,
            where=_where(where),
            resume=resume,
            progress=console.is_terminal,
        )
        if distributed.env_rank() != 0:
            return  # under torchrun every rank returns rank 0's result: one of them reports it
        out.print(
            f"trained on {res['device']}: best epoch {res['best_epoch']}, val loss {res['val_loss']:.2f}, "
            f"threshold {res['threshold']:.4g}, model {res['model_hash'][:12]} in {out_dir}",
            highlight=False,
        )

    run_cli(body)


# ----------------------------------------------------------------------------------------------- augment
@app.command()
def augment(
    model: Annotated[Path, typer.Option("--model", help="Model directory from `medvae train`.")],
    store: StoreOpt,
    count: Annotated[int, typer.Option("--count", help="Synthetic images to sample.")] = 64,
    label: Annotated[
        str | None, typer.Option("--label", help="Only this label (conditional models).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dicom: Annotated[
        Path | None, typer.Option("--dicom", help="Also write Secondary Capture DICOMs here.")
    ] = None,
    pictures: Annotated[
        Path | None, typer.Option("--pictures", help="Write reconstruction/sample/interpolation grids here.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample synthetic images, drop near-copies of training images, and commit them as a new version."""

    def body() -> None:
        from medvae.config import AugmentConfig
        from medvae.jobs import augment_job, pictures_job

        overrides = [*(set_ or []), f"count={count}", f"seed={seed}"]
        if label:
            overrides.append(f"label={label}")
        if dicom:
            overrides.append(f"write_dicom={dicom}")
        cfg = load_config(AugmentConfig, config, overrides)
        res = augment_job(model, store, cfg)
        out.print(
            f"kept {res['kept']} of {res['requested']} synthetic images (privacy filter rejected "
            f"{res['rejection_rate']:.1%}, threshold {res['privacy_threshold']:.4f}); "
            + (f"version {res['version']}" if res["version"] is not None else "no new version"),
            highlight=False,
        )
        if pictures is not None:
            for p in pictures_job(model, store, pictures, seed=seed):
                out.print(f"wrote {p}", highlight=False)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- screen
@app.command()
def screen(
    sources: Annotated[list[Path], typer.Argument(help="Scans (files or folders) to screen.")],
    model: Annotated[Path, typer.Option("--model", help="Model directory from `medvae train`.")],
    out_csv: Annotated[Path | None, typer.Option("--out", help="Write per-scan scores to this CSV.")] = None,
    heatmaps: Annotated[Path | None, typer.Option("--heatmaps", help="Write heat-map PNGs here.")] = None,
) -> None:
    """Score new scans for anomalies: latent score, percentile among normals, and a flag."""

    def body() -> None:
        from medvae.jobs import screen_job

        res = screen_job(model, sources, out_csv=out_csv, heatmaps_dir=heatmaps)
        if out_csv is None:
            table = Table("file", "score", "percentile", "flag")
            for r in res["results"]:
                table.add_row(
                    r["file"], f"{r['score']:.3f}", f"{r['percentile']:.1f}", "FLAG" if r["flag"] else ""
                )
            out.print(table)
        for r in res["rejected_files"]:
            console.print(f"[yellow]rejected[/] {r['file']}: {r['reason']}", highlight=False, soft_wrap=True)
        out.print(
            f"scored {res['scored']}, flagged {res['flagged']}, rejected {res['rejected']}", highlight=False
        )
        if res["scored"] == 0:
            raise typer.Exit(1)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    source: Annotated[str, typer.Argument(help="A labelled ImageFolder directory, or a store URI.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, report.html, pictures/.")],
    normal_label: Annotated[
        str, typer.Option("--normal-label", help="The normal label; every other label is abnormal.")
    ] = "normal",
    version: VersionOpt = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated model seeds (default 0,1,2).")
    ] = None,
    split_seed: Annotated[
        int | None, typer.Option("--split-seed", help="Seed of the patient-grouped split.")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="train,val,test shares assigned per patient (default 0.7,0.1,0.2)."),
    ] = None,
    no_utility: Annotated[
        bool, typer.Option("--no-utility", help="Anomaly screening and fidelity only.")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate screening, fidelity, synthetic-data utility and privacy on labelled real scans.

    Splits are by patient (the Kermany ``personN``/``IM-NNNN`` and NIH ``NNNNNNNN_`` file-name keys, or the
    store's patient key) and every figure is repeated over the seeds as mean ± sd.
    """

    def body() -> None:
        from medvae.eval.study import EvaluateConfig, summary_lines
        from medvae.eval.study import evaluate as do_evaluate

        overrides = list(set_ or [])
        if seeds:
            overrides.append(f"seeds=[{seeds}]")
        if split_seed is not None:
            overrides.append(f"split_seed={split_seed}")
        if split:
            overrides.append(f"split_fractions=[{split}]")
        if no_utility:
            overrides.append("utility=false")
        if device:
            overrides.append(f"device={device}")
        cfg = load_config(EvaluateConfig, config, overrides)
        metrics = do_evaluate(
            source, out_dir, normal_label=normal_label, cfg=cfg, store_version=version, progress=True
        )
        for line in summary_lines(metrics):
            out.print(line, highlight=False, soft_wrap=True)  # a figure split over two lines misleads
        out.print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'}", highlight=False)

    run_cli(body)


# ----------------------------------------------------------------------------------------------- run / serve
PipelineOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML.")]


@app.command()
def run(config: PipelineOpt = Path("configs/pipeline.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline once: ingest → train → augment → screen → one new store version."""

    def body() -> None:
        from flows.pipeline import pipeline_flow
        from medvae.config import PipelineConfig, to_jsonable

        cfg = load_config(PipelineConfig, config, set_)
        res = pipeline_flow(to_jsonable(cfg))
        out.print_json(json.dumps(res))

    run_cli(body)


@app.command()
def serve(
    config: PipelineOpt = Path("configs/pipeline.yaml"),
    set_: SetOpt = None,
    name: Annotated[str, typer.Option("--name")] = "medvae-scheduled",
) -> None:
    """Serve the pipeline as a Prefect deployment on the config's cron schedule (runs until stopped)."""

    def body() -> None:
        from flows.pipeline import pipeline_flow
        from medvae.config import PipelineConfig, to_jsonable

        cfg = load_config(PipelineConfig, config, set_)
        console.print(f"serving {name} on cron {cfg.schedule!r}; Ctrl-C to stop", highlight=False)
        pipeline_flow.serve(name=name, cron=cfg.schedule, parameters={"config": to_jsonable(cfg)})

    run_cli(body)


def main(argv: list[str] | None = None) -> Any:
    """Entry point for ``python -m medvae``."""
    return app(args=argv if argv is not None else sys.argv[1:])
