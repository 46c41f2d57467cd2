"""Crash and concurrency harness shared by the tests and ``benchmarks/kill_campaign.py``.

Every medvae command is run as a real subprocess (``python -m medvae ...``) in its own process group and
killed with SIGKILL at a seeded random moment, like a power cut or the OOM killer; the store and the
training checkpoint are then audited from the outside and the same command is re-run to completion.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
# The tiny model of tests/flows/test_pipeline.py; patience above the epoch count so that every run trains all
# epochs and a resumed history can be compared epoch by epoch with an uninterrupted one.
TINY_TRAIN = [
    "--set",
    "model.channels=[8,16,32,32]",
    "--set",
    "model.latent_dim=8",
    "--set",
    "batch_size=16",
    "--set",
    "patience=1000",
    "--device",
    "cpu",
]
AUGMENT_COUNT = 16
COMMANDS = ("ingest", "train", "augment")  # the default campaign; "run" (the Prefect pipeline) on request


def subprocess_env() -> dict[str, str]:
    """The environment of every medvae subprocess: one BLAS/OpenMP thread, no colour.

    One thread makes the tiny runs deterministic (a resumed run must match an uninterrupted one bit for
    bit on the CPU) and keeps two concurrent subprocesses from oversubscribing a small machine.
    """
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1", "TERM": "dumb"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def medvae_cmd(*args: str) -> list[str]:
    """The argv of ``python -m medvae ARGS`` with this interpreter."""
    return [sys.executable, "-m", "medvae", *args]


def make_pngs(dest: Path, n: int = 40, seed: int = 0, size: int = 48) -> list[Path]:
    """Write ``n`` distinct smooth grey PNGs (blobs on a gradient) under ``dest/normal``.

    Smooth images, not noise: a VAE sample of noise sits closer to every training image than they sit to
    each other, so augment's privacy filter would reject every sample and commit nothing.

    Returns:
        The paths, sorted.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = dest / "normal"
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(3):
            cy, cx = rng.random(2)
            s = 0.1 + 0.2 * rng.random()
            img += rng.random() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img += 0.3 * rng.random() * yy
        p = out / f"img{i:03d}.png"
        Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def run_medvae(
    args: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run a medvae command to completion; returns its wall time and the completed process.

    Args:
        args: the medvae arguments.
        timeout: seconds.
        env: variables added to :func:`subprocess_env`.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(
        medvae_cmd(*args),
        capture_output=True,
        text=True,
        env={**subprocess_env(), **(env or {})},
        timeout=timeout,
        check=False,
    )
    return time.perf_counter() - t0, proc


@dataclass
class Kill:
    """One SIGKILL: whether it landed while the command still ran, and when."""

    mid_run: bool
    delay: float
    returncode: int | None


def run_and_kill(
    args: Sequence[str],
    delay: float,
    before_kill: Callable[[], None] | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> Kill:
    """Start a medvae command and SIGKILL its whole process group ``delay`` seconds after the start.

    A command that ends before the kill is not an error: the kill did not land mid-run, and the outcome
    says so (on a loaded machine, timing is never assumed).

    Args:
        args: the medvae arguments.
        delay: seconds after the start.
        before_kill: called just before the kill (e.g. to read the checkpoint the run has written).
        timeout: the longest the command may run when the kill comes too late.
        env: variables added to :func:`subprocess_env`.
    """
    proc = subprocess.Popen(
        medvae_cmd(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**subprocess_env(), **(env or {})},
        start_new_session=True,  # its own process group: decoder workers die with it, as in a crash
    )
    try:
        proc.wait(timeout=delay)
        return Kill(False, delay, proc.returncode)
    except subprocess.TimeoutExpired:
        pass
    if before_kill is not None:
        before_kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        mid = True
    except ProcessLookupError:  # it ended between the check and the kill
        mid = False
    proc.wait(timeout=timeout)
    # A process that exited on its own in the window reports its exit code, not -SIGKILL.
    return Kill(mid and proc.returncode == -signal.SIGKILL, delay, proc.returncode)


# ------------------------------------------------------------------------------------------------ audits
def committed_versions(uri: Path) -> list[int]:
    """Every version the store lists, oldest first (empty when there is no store)."""
    from medvae.data.store import Store

    s = Store(uri)
    return [h.version for h in s.history()] if s.exists() else []


def audit_store(uri: Path) -> list[str]:
    """Read back every version of a store; return what is wrong (empty: nothing).

    Checks: versions are contiguous from 0; every version's rows read back (no missing data file); the
    rows read equal the row count of the version's add actions; ids are unique within each version;
    every ``pixels`` value has height*width bytes; the rows a version adds equal its lineage
    ``rows_added`` (ingest) or ``privacy.kept`` (augment) where recorded; the latest version opens.
    """
    from medvae.data.store import Store

    s = Store(uri)
    if not s.exists():
        return []
    problems: list[str] = []
    try:
        hist = s.history()
    except Exception as exc:  # any failure to list versions is a corruption finding, not a test crash
        return [f"history unreadable: {type(exc).__name__}: {exc}"]
    versions = [h.version for h in hist]
    if versions != list(range(len(versions))):
        problems.append(f"versions not contiguous: {versions}")
    prev = 0
    for h in hist:
        try:
            t = s.read(h.version, columns=["id", "pixels", "height", "width"])
        except Exception as exc:
            problems.append(f"v{h.version}: unreadable: {type(exc).__name__}: {exc}")
            continue
        n = t.num_rows
        ids = t.column("id").to_pylist()
        if n != h.rows:
            problems.append(f"v{h.version}: {n} rows read, {h.rows} in its add actions")
        if len(set(ids)) != n:
            problems.append(f"v{h.version}: {n - len(set(ids))} duplicate ids")
        sizes = zip(
            t.column("pixels").to_pylist(),
            t.column("height").to_pylist(),
            t.column("width").to_pylist(),
            strict=True,
        )
        if any(len(p) != hh * ww for p, hh, ww in sizes):
            problems.append(f"v{h.version}: pixel buffers of the wrong size")
        added, lin = n - prev, h.lineage
        if "rows_added" in lin and lin["rows_added"] != added:
            problems.append(f"v{h.version}: lineage rows_added={lin['rows_added']}, version added {added}")
        privacy = lin.get("privacy")
        if h.operation == "augment" and isinstance(privacy, dict) and privacy.get("kept") != added:
            problems.append(f"v{h.version}: lineage kept={privacy.get('kept')}, version added {added}")
        # A pipeline version inserts its kept synthetic rows, fewer when a re-run sampled the same ones.
        if (
            h.operation == "pipeline"
            and isinstance(privacy, dict)
            and not 0 <= added <= privacy.get("kept", 0)
        ):
            problems.append(f"v{h.version}: lineage kept={privacy.get('kept')}, version added {added}")
        prev = n
    try:
        latest = s.version()
        if versions and latest != versions[-1]:
            problems.append(f"store opens at v{latest}, history ends at v{versions[-1]}")
    except Exception as exc:
        problems.append(f"store does not open: {type(exc).__name__}: {exc}")
    return problems


def store_ids(uri: Path) -> list[str]:
    """The ids of the latest version (with repeats, if any)."""
    from medvae.data.store import Store

    return [str(v) for v in Store(uri).read(columns=["id"]).column("id").to_pylist()]


def checkpoint_of(model_dir: Path) -> dict[str, Any] | None:
    """The training checkpoint of a model directory, or None when none was written yet."""
    from medvae.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint

    path = model_dir / "checkpoint" / CHECKPOINT_NAME
    return load_checkpoint(path) if path.exists() else None


# ------------------------------------------------------------------------------------------------ trials
@dataclass
class Trial:
    """The outcome of one kill-audit-rerun trial of one command."""

    command: str
    mid_run: bool
    delay: float
    corrupted: list[str] = field(default_factory=list)  # audit findings after the kill and the rerun
    rerun_error: str | None = None  # None: the re-run completed and the final state is the expected one
    epochs_lost: int | None = None  # train only
    note: str = ""  # what the trial saw, for the campaign's --verbose output


@dataclass
class Campaign:
    """Shared inputs of all trials: PNGs, a base store, and one uninterrupted run of every command.

    The uninterrupted runs give the kill-delay bounds (their wall time) and the expected end states.

    Attributes:
        root: scratch folder.
        epochs: training epochs of every train run.
        bounds: wall seconds of the uninterrupted run of each command.
        first_checkpoint: seconds from the start of the uninterrupted training to its first checkpoint.
    """

    root: Path
    epochs: int = 25
    bounds: dict[str, float] = field(default_factory=dict)
    first_checkpoint: float | None = None

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def base_store(self) -> Path:  # v0: the first half of the PNGs
        return self.root / "base_store"

    @property
    def ref_store(self) -> Path:  # v0 + every PNG: what a completed ingest leaves, and what train reads
        return self.root / "ref_store"

    @property
    def ref_model(self) -> Path:
        return self.root / "ref_model"

    @property
    def aug_store(self) -> Path:  # ref_store + one completed augment
        return self.root / "aug_store"

    def ingest_args(self, store: Path) -> list[str]:
        return ["ingest", str(self.src), "--store", str(store), "--workers", "1"]

    def train_args(self, out: Path, resume: bool = False) -> list[str]:
        args = ["train", "--store", str(self.ref_store), "--out", str(out), "--epochs", str(self.epochs)]
        return [*args, *TINY_TRAIN, *(["--resume"] if resume else [])]

    def augment_args(self, store: Path) -> list[str]:
        return [
            "augment",
            "--model",
            str(self.ref_model),
            "--store",
            str(store),
            "--count",
            str(AUGMENT_COUNT),
        ]

    def prepare(self, n_images: int = 40) -> Campaign:
        """Make the inputs and run every command once, uninterrupted, measuring it."""
        from medvae.config import IngestConfig
        from medvae.data.ingest import ingest
        from medvae.data.store import Store

        paths = make_pngs(self.src, n_images)
        ingest(paths[: n_images // 2], Store(self.base_store), IngestConfig(workers=1))
        shutil.copytree(self.base_store, self.ref_store)
        # While the uninterrupted training runs, note when its first checkpoint appears: most of a tiny
        # run is start-up, so half the train kills are drawn after that moment to hit the epoch loop.
        ckpt = self.ref_model / "checkpoint" / "checkpoint.pt"
        done = threading.Event()
        t0 = time.perf_counter()

        def watch() -> None:
            while not done.is_set():
                if ckpt.exists():
                    self.first_checkpoint = time.perf_counter() - t0
                    return
                time.sleep(0.01)

        for name, args in (
            ("ingest", self.ingest_args(self.ref_store)),
            ("train", self.train_args(self.ref_model)),
        ):
            watcher = threading.Thread(target=watch, daemon=True)
            if name == "train":
                done.clear()
                t0 = time.perf_counter()
                watcher.start()
            self.bounds[name], proc = run_medvae(args)
            done.set()
            if proc.returncode != 0:
                raise RuntimeError(f"uninterrupted {name} failed: {proc.stderr[-2000:]}")
        shutil.copytree(self.ref_store, self.aug_store)
        self.bounds["augment"], proc = run_medvae(self.augment_args(self.aug_store))
        if proc.returncode != 0 or Store(self.aug_store).version() != Store(self.ref_store).version() + 1:
            raise RuntimeError(
                f"uninterrupted augment committed nothing: {proc.stdout} {proc.stderr[-2000:]}"
            )
        return self

    def run_trial(self, command: str, rng: random.Random, work: Path, new_store: bool = False) -> Trial:
        """One trial: kill ``command`` at a random moment in [0, its uninterrupted time], audit, re-run.

        Args:
            command: ``ingest``, ``train`` or ``augment``.
            rng: draws the kill moment.
            work: the trial's scratch folder.
            new_store: ingest only: into no store at all (the kill may hit the store's creation), not
                into a copy of the half-filled base store.
        """
        low = 0.0
        if command == "train" and self.first_checkpoint is not None and rng.random() < 0.5:
            low = self.first_checkpoint
        delay = rng.uniform(low, self.bounds[command])
        work.mkdir(parents=True, exist_ok=True)
        if command == "train":
            return self._train_trial(delay, work)
        if command == "run":
            return self._run_trial(delay, work)
        base, expected = (
            (self.base_store, self.ref_store) if command == "ingest" else (self.ref_store, self.aug_store)
        )
        store = work / "store"
        if not new_store:
            shutil.copytree(base, store)
        args = self.ingest_args(store) if command == "ingest" else self.augment_args(store)
        before = committed_versions(store)
        kill = run_and_kill(args, delay)
        trial = Trial(command, kill.mid_run, delay)
        after = committed_versions(store)
        trial.corrupted += audit_store(store)
        # The killed command commits one version or none; every version seen before is still there.
        if after[: len(before)] != before or len(after) not in (len(before), len(before) + 1):
            trial.corrupted.append(f"versions before the kill {before}, after {after}")
        _, proc = run_medvae(args)
        trial.corrupted += [f"after rerun: {p}" for p in audit_store(store)]
        final = committed_versions(store)
        trial.note = f"versions before the kill {before}, after it {after}, after the rerun {final}"
        if proc.returncode != 0:
            trial.rerun_error = f"rerun exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
            return trial
        got = store_ids(store)
        # A new store has its own key, hence its own ids: expect every PNG once, under that key.
        want = (
            sorted(expected_ids(store, sorted(self.src.rglob("*.png")))) if new_store else store_ids(expected)
        )
        if sorted(got) != sorted(want):
            lost, extra = set(want) - set(got), set(got) - set(want)
            trial.rerun_error = (
                f"final ids differ: {len(lost)} missing, {len(extra)} unexpected, {len(got)} rows"
            )
        elif len(committed_versions(store)) != len(before) + 1:
            trial.rerun_error = (
                f"expected exactly one new version over {before}, got {committed_versions(store)}"
            )
        return trial

    def run_args(self, work: Path) -> list[str]:
        """``medvae run`` of the whole pipeline on the PNGs into ``work/store``, with the tiny model."""
        sets = {
            "sources": f"[{self.src}]",
            "store": str(work / "store"),
            "model_dir": str(work / "model"),
            "ingest.workers": "1",
            "train.epochs": str(self.epochs),
            "train.model.channels": "[8,16,32,32]",
            "train.model.latent_dim": "8",
            "train.batch_size": "16",
            "train.patience": "1000",
            "train.device": "cpu",
            "augment.count": str(AUGMENT_COUNT),
        }
        args = ["run", "-c", str(REPO / "configs" / "pipeline.yaml")]
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        return args

    def prepare_run(self) -> None:
        """Measure one uninterrupted ``medvae run`` (the bound of the pipeline's kill delays)."""
        work = self.root / "ref_run"
        (work / "prefect").mkdir(parents=True, exist_ok=True)
        self.bounds["run"], proc = run_medvae(
            self.run_args(work), env={"PREFECT_HOME": str(work / "prefect")}
        )
        if proc.returncode != 0:
            raise RuntimeError(f"uninterrupted run failed: {proc.stderr[-2000:]}")

    def _run_trial(self, delay: float, work: Path) -> Trial:
        # Its own Prefect home: a temporary Prefect server killed mid-write must not break the re-run's.
        env = {"PREFECT_HOME": str(work / "prefect")}
        (work / "prefect").mkdir(parents=True, exist_ok=True)
        store = work / "store"
        kill = run_and_kill(self.run_args(work), delay, env=env)
        trial = Trial("run", kill.mid_run, delay)
        after = committed_versions(store)
        trial.corrupted += audit_store(store)
        if after not in ([], [0], [0, 1]):
            trial.corrupted.append(f"versions after the kill {after}: expected at most ingest + pipeline")
        _, proc = run_medvae(self.run_args(work), env=env)
        trial.corrupted += [f"after rerun: {p}" for p in audit_store(store)]
        final = committed_versions(store)
        trial.note = f"versions after the kill {after}, after the rerun {final}"
        if proc.returncode != 0:
            trial.rerun_error = f"rerun exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
            return trial
        from medvae.data.store import Store

        t = Store(store).read(columns=["id", "origin", "anomaly_score"])
        origin = t.column("origin").to_pylist()
        real = [i for i, o in zip(t.column("id").to_pylist(), origin, strict=True) if o == "real"]
        want = expected_ids(store, sorted(self.src.rglob("*.png")))
        if sorted(real) != sorted(want):
            trial.rerun_error = f"real rows: {len(real)} ({len(set(real))} distinct), expected {len(want)}"
        elif origin.count("synthetic") == 0:
            trial.rerun_error = "no synthetic rows after the re-run"
        elif any(
            s is None
            for s, o in zip(t.column("anomaly_score").to_pylist(), origin, strict=True)
            if o == "real"
        ):
            trial.rerun_error = "real rows without anomaly scores after the re-run"
        return trial

    def _train_trial(self, delay: float, work: Path) -> Trial:
        out = work / "model"
        seen: dict[str, Any] = {}

        def read_checkpoint() -> None:
            seen["ckpt"] = checkpoint_of(out)

        kill = run_and_kill(self.train_args(out), delay, before_kill=read_checkpoint)
        trial = Trial("train", kill.mid_run, delay)
        before = seen.get("ckpt")
        try:
            after = checkpoint_of(out)
        except Exception as exc:  # a torn checkpoint is exactly what the atomic write must prevent
            trial.corrupted.append(f"checkpoint unreadable after the kill: {type(exc).__name__}: {exc}")
            return trial
        e_before = int(before["epoch"]) if before else -1
        e_after = int(after["epoch"]) if after else -1
        if e_after < e_before:
            trial.corrupted.append(f"checkpoint went back from epoch {e_before} to {e_after}")
        _, proc = run_medvae(self.train_args(out, resume=True))
        if proc.returncode != 0:
            trial.rerun_error = f"resume exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
            return trial
        final = checkpoint_of(out)
        hist = list(final["history"]) if final else []
        carried = list(after["history"]) if after else []
        # Where the resumed run started: the epochs it carried over unchanged (their wall times included)
        # from the checkpoint; a recomputed epoch has a new wall time.
        start = 0
        while start < min(len(hist), len(carried)) and hist[start] == carried[start]:
            start += 1
        if start != e_after + 1:
            trial.rerun_error = f"resume started at epoch {start}, the checkpoint held epochs 0..{e_after}"
        # Work at the kill: the epochs checkpointed when it came, plus the one in flight (if any was).
        in_flight = 1 if kill.mid_run and e_before + 1 < self.epochs else 0
        trial.epochs_lost = max(0, e_before + 1 + in_flight - start)
        trial.note = f"checkpoint epoch at the kill {e_before}, after it {e_after}; resumed at epoch {start}"
        ref = checkpoint_of(self.ref_model)
        ref_hist = list(ref["history"]) if ref else []
        if [h["epoch"] for h in hist] != list(range(self.epochs)):
            trial.rerun_error = f"resumed history has epochs {[h['epoch'] for h in hist]}"
        elif len(ref_hist) != len(hist) or not all(
            np.isclose(h[k], r[k], rtol=1e-5, atol=0.0)
            for h, r in zip(hist, ref_hist, strict=True)
            for k in ("loss", "val_loss")
        ):
            trial.rerun_error = "resumed run's losses differ from the uninterrupted run's"
        for name in ("weights.safetensors", "metrics.json", "calibration.json"):
            if not (out / name).is_file():
                trial.rerun_error = f"resumed run left no {name}"
        return trial


def run_trials(campaign: Campaign, command: str, trials: int, seed: int, work: Path) -> list[Trial]:
    """``trials`` trials of one command, each with its own seeded kill moment and scratch folder."""
    rng = random.Random(f"{seed}:{command}")
    # Every other ingest trial starts from no store, so that kills also hit the store's creation.
    return [
        campaign.run_trial(command, rng, work / f"{command}{i}", new_store=command == "ingest" and i % 2 == 1)
        for i in range(trials)
    ]


# ------------------------------------------------------------------------------------------- concurrency
def _ingest_after_barrier(sources: list[str], store: str, barrier: Any, result: Any) -> None:
    # Imports and config happen before the barrier, so both writers decode and commit at about the same
    # moment: the race is on the commit, which is what the test is about.
    from medvae.config import IngestConfig
    from medvae.data.ingest import ingest
    from medvae.data.store import Store

    cfg = IngestConfig(workers=1)
    barrier.wait(timeout=120)
    try:
        rep = ingest([Path(p) for p in sources], Store(store), cfg)
        result.put(("ok", rep.version, rep.rows_added))
    except Exception as exc:
        result.put(("error", type(exc).__name__, str(exc)))


def concurrent_ingests(
    store: Path, file_sets: Sequence[Sequence[Path]], timeout: float = 240
) -> list[tuple[Any, ...]]:
    """Ingest each file set into ``store`` from its own spawned process, released together by a barrier.

    Returns:
        One ``("ok", version, rows_added)`` or ``("error", exception type, message)`` per writer.
    """
    return _run_together(
        _ingest_after_barrier, [([str(p) for p in fs], str(store)) for fs in file_sets], timeout
    )


def _run_together(target: Any, argses: Sequence[tuple[Any, ...]], timeout: float) -> list[tuple[Any, ...]]:
    """Run ``target(*args, barrier, result)`` in one spawned process per ``args``, released together by a
    barrier; returns what each put on the result queue."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(argses))
    result = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, result)) for args in argses]
    for p in procs:
        p.start()
    out = [result.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=timeout)
    return out


def fake_rows(ids: Sequence[str]) -> pa.Table:
    """Store rows with the given ids and 2x2 blank pixels (for store-level tests)."""
    from medvae.data.store import empty_rows, to_arrow

    buf = empty_rows()
    for rid in ids:
        for k in buf:
            buf[k].append(None)
        buf["id"][-1], buf["height"][-1], buf["width"][-1] = rid, 2, 2
        buf["pixels"][-1], buf["origin"][-1] = b"\0" * 4, "real"
    return to_arrow(buf)


def _insert_after_barrier(store: str, ids: list[str], barrier: Any, result: Any) -> None:
    from medvae.data.store import Store, lineage

    rows = fake_rows(ids)
    barrier.wait(timeout=120)
    try:
        result.put(("ok", Store(store).insert_new(rows, lineage("ingest", {}, rows_added=len(ids)))))
    except Exception as exc:
        result.put(("error", type(exc).__name__, str(exc)))


def concurrent_inserts(
    store: Path, id_sets: Sequence[Sequence[str]], timeout: float = 240
) -> list[tuple[Any, ...]]:
    """``Store.insert_new`` of each id set from its own spawned process, released together by a barrier.

    Tighter than :func:`concurrent_ingests` (no decoding between the barrier and the commit), so the
    commits really collide, including the creation of a new store.
    """
    return _run_together(_insert_after_barrier, [(str(store), list(ids)) for ids in id_sets], timeout)


def expected_ids(store: Path, files: Sequence[Path]) -> set[str]:
    """The row ids that single-frame image files get in ``store`` (keyed by the store's key)."""
    from medvae.data.deid import keyed_hash
    from medvae.data.store import Store

    key = Store(store).key(create=False)
    return {keyed_hash(key, "source", p.read_bytes())[:32] for p in files}
