"""The `medvae` command line: one thin command per pipeline stage over the library.

Every stage command reads its stage config (``--config FILE.yaml``, then ``--set key=value``, then its
dedicated options, each over the pydantic defaults in :mod:`medvae.config`), calls one job, and prints
what it did. Untrusted text (file names, DICOM values, reasons) is printed literally, with control
characters escaped. Expected failures end in one line that says what to do; ``--debug`` shows the
traceback. The orchestrated commands (``serve``) are added by :mod:`flows.cli`.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from medvae._io import printable
from medvae.config import load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: no rich markup in help texts, no "<bool>" metavars on flags.
    rich_markup_mode=None,
    help="medvae: ingest medical scans into a versioned dataset, train a VAE, make synthetic images, screen.",
)
# Pillow's DEBUG records print decoded EXIF/TIFF tag values (Artist, ImageDescription ...): PHI in the logs
# of anyone running with DEBUG logging (e.g. PREFECT_LOGGING_ROOT_LEVEL=DEBUG). Never below INFO for it.
logging.getLogger("PIL").setLevel(logging.INFO)

_STATE: dict[str, bool] = {"debug": False}
T = TypeVar("T")
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})  # full disk, or over quota

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file for this stage.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set key=value (repeatable; e.g. --set epochs=5)."),
]
StoreOpt = Annotated[str, typer.Option("--store", help="Store path or URI (s3://bucket/prefix ...).")]
VersionOpt = Annotated[int | None, typer.Option("--version", help="Store version; latest when omitted.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (the config's when omitted).")]


def say(text: str) -> None:
    """Results on stdout, printed literally (each line of a multi-line text escaped on its own)."""
    print("\n".join(printable(line) for line in text.split("\n")), flush=True)


def note(text: str) -> None:
    """One line of diagnostics (warnings, rejected files, errors) on stderr, printed literally."""
    print(printable(text), file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """A loud warning on stderr: bold red on a terminal, the same text elsewhere."""
    line = printable(text)
    print(f"\x1b[1;31m{line}\x1b[0m" if sys.stderr.isatty() else line, file=sys.stderr, flush=True)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug


def run_cli(fn: Callable[[], T]) -> T:
    """Run a command body; turn failures into one actionable line and exit code 1."""
    from pydantic import ValidationError

    try:
        return fn()
    except (typer.Exit, KeyboardInterrupt):
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        _fail(f"invalid config: {where}: {first.get('msg')} (`medvae config STAGE` lists every setting)", exc)
    except OSError as exc:
        _fail(_os_message(exc), exc)
    except (ValueError, RuntimeError, LookupError) as exc:  # medvae's own errors are RuntimeErrors
        _fail(str(exc) or type(exc).__name__, exc)
    except Exception as exc:  # a bug: still one line, and the way to the traceback
        _fail(f"unexpected {type(exc).__name__}: {exc} (run `medvae --debug ...` for the traceback)", exc)
    raise AssertionError("unreachable")


def _os_message(exc: OSError) -> str:
    if exc.errno in _DISK_FULL:
        # "[Errno 28] No space left on device" alone does not say where or what to do about it.
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (
            f"the disk is full (no space left on device){where}: free some disk space or point "
            "--out/--store at a disk with more room, then run the command again"
        )
    return str(exc) or type(exc).__name__


def _fail(msg: str, exc: BaseException) -> None:
    if _STATE["debug"]:
        import traceback

        traceback.print_exception(exc)
    note(f"error: {' '.join(msg.split())}")
    raise typer.Exit(1) from exc


def _where(pairs: list[str] | None) -> dict[str, str | list[str]] | None:
    """``--where col=value`` filters; a column given several times keeps rows matching any value."""
    out: dict[str, list[str]] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--where {p!r} must look like column=value (e.g. label=normal)")
        k, v = p.split("=", 1)
        out.setdefault(k.strip(), []).append(v)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()} or None


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
        bool, typer.Option("--no-labels", help="Do not take labels from folder names.", metavar="")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a JSON account of every input file here.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoder processes (default: all cores).")
    ] = None,
) -> None:
    """Ingest scans into a new version of the store (de-identified, 64x64, de-duplicated)."""

    def body() -> None:
        from medvae.config import IngestConfig
        from medvae.data.ingest import COMMITTED_CONCURRENTLY
        from medvae.data.ingest import ingest as do_ingest
        from medvae.data.store import Store
        from medvae.jobs.results import IngestSummary

        options = {"labels_csv": labels_csv, "labels": "none" if no_labels else None, "workers": workers}
        cfg = load_config(IngestConfig, config, set_, options)
        rep = do_ingest(sources, Store(store), cfg, on_progress=_progress_printer("ingest"))
        if report is not None:
            rep.write(report)
        for f in rep.files:
            if f.status == "rejected":
                note(f"rejected {f.path}: {f.reason}")
        summary = IngestSummary.of(rep)
        where = (
            f"version {rep.version} of {store}" if rep.version is not None else f"{store} (no new version)"
        )
        # What this call itself committed: files another ingest committed first are not counted as ours.
        raced = sum(1 for f in rep.files if f.reason == COMMITTED_CONCURRENTLY)
        extra = f"; {raced} files were committed by a concurrent ingest" if raced else ""
        note(f"wrote {rep.rows_added} rows to {where}{extra}")
        for w in rep.warnings:
            warn(w)
        say(summary.line())
        if summary.seen == 0:
            _fail("no files found in the given sources", FileNotFoundError(str(sources)))
        if summary.ingested == 0 and summary.skipped == 0:
            _fail("nothing could be ingested; see the reasons above", ValueError("nothing ingested"))

    run_cli(body)


def _progress_printer(what: str) -> Callable[[int, int], None] | None:
    """A rich progress bar on a terminal; nothing when stderr is a pipe or a file (logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task(what, total=None)
    bar.start()

    def tick(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        if done >= total:
            bar.stop()

    return tick


# ----------------------------------------------------------------------------------------------- versions
@app.command()
def versions(
    store: StoreOpt,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.", metavar="")
    ] = False,
) -> None:
    """List the store's versions with row counts, operation and lineage."""

    def body() -> None:
        from medvae.data.store import Store

        hist = Store(store).history()
        if as_json:
            rows = [
                {
                    "version": h.version,
                    "timestamp": h.timestamp,
                    "operation": h.operation,
                    "rows": h.rows,
                    "lineage": h.lineage,
                }
                for h in hist
            ]
            say(json.dumps(rows, indent=2))
            return
        say(f"{'version':>7}  {'operation':<10} {'rows':>8} {'added':>8}  git")
        prev = 0
        for h in hist:
            git = (h.lineage.get("git_commit") or "")[:10]
            say(f"{h.version:>7}  {h.operation:<10} {h.rows:>8} {h.rows - prev:>+8}  {git}")
            prev = h.rows

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
        say(f"exported to {out_dir} (manifest {manifest})")

    run_cli(body)


# ----------------------------------------------------------------------------------------------- train
@app.command()
def train(
    store: StoreOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    version: VersionOpt = None,
    where: Annotated[
        list[str] | None,
        typer.Option("--where", help="Row filter column=value, e.g. label=normal (repeat a column for OR)."),
    ] = None,
    conditional: Annotated[
        bool, typer.Option("--conditional", help="Train a label-conditional VAE.", metavar="")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda (default: auto).")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs (the config's when omitted).")
    ] = None,
    seed: SeedOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the model directory's checkpoint.", metavar="")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Training processes on this machine (one per GPU): more than 1 runs DistributedDataParallel "
            "under torchrun; batch_size stays the global batch (docs/distributed_training.md).",
        ),
    ] = 1,
) -> None:
    """Train the VAE on a store version, calibrate its anomaly threshold, and write a model directory."""

    def body() -> None:
        from medvae.config import TrainConfig

        options = {
            "model": {"conditional": True if conditional else None},
            "device": device,
            "epochs": epochs,
            "seed": seed,
        }
        cfg = load_config(TrainConfig, config, set_, options)
        job = {
            "store": store,
            "out_dir": str(out_dir),
            "version": version,
            "where": _where(where),
            "resume": resume,
        }
        if nproc > 1:
            _launch_torchrun(nproc, cfg, job)
            return
        _train(cfg, job, progress=sys.stderr.isatty())

    run_cli(body)


def _train(cfg: Any, job: dict[str, Any], *, progress: bool) -> None:
    """Run the train job (in this process, or as one torchrun rank) and report it once."""
    from medvae.engine import strategy as distributed
    from medvae.jobs.train import train_job

    res = train_job(
        job["store"],
        Path(job["out_dir"]),
        cfg,
        version=job["version"],
        where=job["where"],
        resume=job["resume"],
        progress=progress,
    )
    if distributed.env_rank() != 0:
        return  # under torchrun every rank returns rank 0's result: one of them reports it
    for warning in res.warnings:
        note(f"warning: {warning}")
    val = f"{res.val_loss:.2f}" if res.val_loss is not None else "n/a"
    say(
        f"trained on {res.device}: best epoch {res.best_epoch}, val loss {val}, "
        f"threshold {res.threshold:.4g}, model {res.model_hash[:12]} in {res.model_dir}"
    )


def _launch_torchrun(nproc: int, cfg: Any, job: dict[str, Any]) -> None:
    """Run the resolved job under torchrun: every rank reads the same job file, so none re-parses options."""
    from medvae._io import atomic_write_json
    from medvae.config import to_jsonable
    from medvae.engine import strategy as distributed

    distributed.per_rank_batch(cfg.batch_size, nproc)  # fail here, once, not in every rank
    spec = Path(job["out_dir"]) / ".train-job.json"
    atomic_write_json(spec, {**job, "config": to_jsonable(cfg), "debug": _STATE["debug"]})
    code = distributed.launch(nproc, ["--job", str(spec)])
    if code != 0:
        raise RuntimeError(
            f"distributed training failed (torchrun exited with code {code}); the ranks' errors are above"
        )


def train_from_job_file(path: Path) -> None:
    """One torchrun rank of ``medvae train --nproc N``: run the job that the launcher resolved."""
    from medvae.config import TrainConfig

    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    _STATE["debug"] = bool(spec.pop("debug", False))
    cfg = TrainConfig.model_validate(spec.pop("config"))
    run_cli(lambda: _train(cfg, spec, progress=False))


# ----------------------------------------------------------------------------------------------- augment
@app.command()
def augment(
    model: Annotated[Path, typer.Option("--model", help="Model directory from `medvae train`.")],
    store: StoreOpt,
    count: Annotated[
        int | None, typer.Option("--count", help="Synthetic images to sample (default 64).")
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="Only this label (the model must know it).")
    ] = None,
    seed: SeedOpt = None,
    dicom: Annotated[
        Path | None, typer.Option("--dicom", help="Also write Secondary Capture DICOMs here.")
    ] = None,
    pictures: Annotated[
        Path | None, typer.Option("--pictures", help="Write synthetic sample grids (one per label) here.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample synthetic images, drop near-copies of training images, and commit them as a new version."""

    def body() -> None:
        from medvae.config import AugmentConfig
        from medvae.jobs.augment import augment_job, sample_pictures

        options = {"count": count, "label": label, "seed": seed, "write_dicom": dicom}
        cfg = load_config(AugmentConfig, config, set_, options)
        res = augment_job(model, store, cfg)
        where = f"version {res.version}" if res.version is not None else "no new version"
        say(
            f"kept {res.kept} of {res.requested} synthetic images from {res.drawn} samples (privacy filter "
            f"rejected {res.rejection_rate:.1%}, threshold {res.privacy_threshold:.4f}); "
            f"added {res.rows_added} rows: {where}"
        )
        if res.kept < res.requested:
            note(
                f"note: only {res.kept} of {res.requested} samples passed the privacy filter within "
                f"{cfg.max_draws:g}x as many draws; raise --set max_draws=N, or train the model longer"
            )
        if res.already_present:
            note(
                f"note: {res.already_present} kept images were already in the store (same model, seed "
                "and label as an earlier augment); pass another --seed for new ones"
            )
        if res.dicom_dir:
            say(f"wrote {res.dicom_files} DICOM files to {res.dicom_dir}")
        if pictures is not None:
            for p in sample_pictures(model, pictures, seed=cfg.seed, label=cfg.label, how=cfg):
                say(f"wrote {p}")

    run_cli(body)


# ----------------------------------------------------------------------------------------------- screen
@app.command()
def screen(
    sources: Annotated[list[Path], typer.Argument(help="Scans (files or folders) to screen.")],
    model: Annotated[Path, typer.Option("--model", help="Model directory from `medvae train`.")],
    out_csv: Annotated[Path | None, typer.Option("--out", help="Write per-scan scores to this CSV.")] = None,
    heatmaps: Annotated[Path | None, typer.Option("--heatmaps", help="Write heat-map PNGs here.")] = None,
    score: Annotated[
        str | None,
        typer.Option("--score", help="The score that flags (default: the model's own, lowpass_error)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score new scans for anomalies: the score, its percentile among normals, and a flag."""

    def body() -> None:
        from medvae.config import ScreenConfig
        from medvae.jobs.screen import screen_job

        cfg = load_config(ScreenConfig, config, set_, {"score": score})
        res = screen_job(model, sources, out_csv=out_csv, heatmaps_dir=heatmaps, cfg=cfg)
        if out_csv is None:
            for r in res.records:
                if r.status == "scored":
                    flag = "FLAG" if r.flagged else ""
                    say(f"{r.file}\t{r.scores['score']:.3f}\t{r.scores['percentile']:.1f}\t{flag}")
        for r in res.records:
            if r.status != "scored":
                note(f"rejected {r.file}: {r.reason}")
        for warning in res.warnings if res.records else ():  # no files at all is the error below
            note(f"warning: {warning}")
        say(f"scored {res.scored}, flagged {res.flagged}, rejected {res.rejected}")
        if not res.records:
            _fail(f"no files found in {', '.join(map(str, sources))}", FileNotFoundError(str(sources)))
        if res.scored == 0:
            _fail(f"none of the {res.rejected} files could be scored; see the reasons above", ValueError())

    run_cli(body)


@app.command()
def recalibrate(
    sources: Annotated[list[Path], typer.Argument(help="Normal scans of this site (files or folders).")],
    model: Annotated[
        Path, typer.Option("--model", help="Model directory to recalibrate (changed in place).")
    ],
    fpr: Annotated[
        float | None, typer.Option("--fpr", help="Target false-positive rate (the model's when omitted).")
    ] = None,
) -> None:
    """Set a model's anomaly thresholds on a few hundred of this site's own normal scans.

    Every site's scanners differ, and a threshold calibrated on another cohort's normals does not
    promise its false-positive rate here. The latent reference stays; the thresholds and percentiles
    are replaced, and the model directory's hash changes.
    """

    def body() -> None:
        from medvae.jobs.screen import recalibrate_job

        res = recalibrate_job(model, sources, fpr=fpr)
        for r in res.records:
            if r.status != "scored":
                note(f"rejected {r.file}: {r.reason}")
        for warning in res.warnings:
            note(f"warning: {warning}")
        low, high = res.fpr_interval
        say(
            f"recalibrated on {res.used} normal scans: threshold {res.threshold_before:.4g} -> "
            f"{res.threshold:.4g} for {res.fpr:.0%} false positives (95 % interval {low:.1%}-{high:.1%}; "
            f"the old calibration flagged {res.flagged_before:.1%} of them); model {res.model_hash[:12]}"
        )

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
        bool, typer.Option("--no-utility", help="Anomaly screening and fidelity only.", metavar="")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate screening, fidelity, synthetic-data utility and privacy on labelled real scans.

    Splits are by patient (the Kermany personN / IM-NNNN and NIH NNNNNNNN_ file-name keys, or the
    store's patient key), and every figure is repeated over the seeds as mean and sd. For an ImageFolder,
    screening is also evaluated on a shift-aware split (a new acquisition batch and the earliest
    acquisitions held out, see `medvae config evaluate`, shift), reported beside the patient split.
    """

    def body() -> None:
        from medvae.config import EvaluateConfig
        from medvae.eval.study import evaluate as do_evaluate
        from medvae.eval.study import summary_lines

        options = {
            "seeds": [int(s) for s in seeds.split(",")] if seeds else None,
            "split_seed": split_seed,
            "split_fractions": [float(s) for s in split.split(",")] if split else None,
            "utility": False if no_utility else None,
            "device": device,
        }
        cfg = load_config(EvaluateConfig, config, set_, options)
        metrics = do_evaluate(
            source, out_dir, normal_label=normal_label, cfg=cfg, store_version=version, progress=True
        )
        for line in summary_lines(metrics):
            # A score running backwards (AUROC < 0.5) must not scroll past unnoticed among the figures.
            (warn if line.startswith("WARNING:") else say)(line)
        say(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'}")
        if metrics["warnings"]:
            warn(f"WARNING: {len(metrics['warnings'])} AUROC value(s) below 0.5; see the report's banner")

    run_cli(body)


# ----------------------------------------------------------------------------------------------- run / config
PipelineOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Pipeline YAML (default configs/pipeline.yaml).")
]


@app.command()
def run(config: PipelineOpt = Path("configs/pipeline.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline once, here: ingest, train, augment, screen, one new store version.

    It needs no Prefect server. `medvae serve` runs the same pipeline as a scheduled Prefect deployment.
    """

    def body() -> None:
        from medvae.config import PipelineConfig
        from medvae.jobs.pipeline import run_pipeline

        res = run_pipeline(load_config(PipelineConfig, config, set_), echo=note)
        say(json.dumps(res.to_dict(), indent=2))

    run_cli(body)


STAGES = ("ingest", "train", "augment", "screen", "pipeline", "evaluate", "runner")


@app.command(name="config")
def show_config(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print a stage's resolved config as YAML: every setting, from the one source of defaults."""

    def body() -> None:
        import yaml

        from medvae import config as configs
        from medvae.config import to_jsonable

        names = dict(
            zip(
                STAGES,
                ("Ingest", "Train", "Augment", "Screen", "Pipeline", "Evaluate", "Runner"),
                strict=True,
            )
        )
        if stage not in names:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        cls = getattr(configs, f"{names[stage]}Config")
        say(yaml.safe_dump(to_jsonable(load_config(cls, config, set_)), sort_keys=False).rstrip())

    run_cli(body)


def main(argv: list[str] | None = None) -> Any:
    """Entry point for ``python -m medvae`` (the library commands; `medvae serve` lives in flows.cli)."""
    return app(args=argv if argv is not None else sys.argv[1:])
