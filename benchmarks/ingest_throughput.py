#!/usr/bin/env python3
"""Ingest throughput: the real `medvae ingest` command against a loop of MONAI LoadImage + Resize, and a
no-op re-ingest against the first ingest, all measured in one run.

Usage: python benchmarks/ingest_throughput.py [--kermany DIR] [--dicom DIR] [--limit N] [--repeats R]
       [--intensity clahe|none] [--no-bytecode-cache]

For each data set and repeat, in this order, so that machine noise hits every side:

1. ``medvae ingest DIR --store NEW`` as a subprocess, timed from launch to exit: interpreter start-up,
   imports, walk, decode, de-identify, normalise to 64×64 (CLAHE, the shipped default, unless
   ``--intensity none``), the process pool, and the commit of one Delta version;
2. the same command again over the unchanged folder into the same store (the no-op re-ingest), timed the
   same way, and the same no-op through ``medvae.data.ingest.ingest`` in this process (no start-up);
3. a single loop of MONAI's ``LoadImage`` + ``EnsureChannelFirst`` + ``Resize((64, 64))`` in this process,
   MONAI imported and the transform built before the clock starts, no CLAHE and no store write, on one
   torch thread (its fastest here; ``--monai-threads``): every choice favours MONAI.

The command runs as an installed program does: with its bytecode cached (a warm-up run fills
``PYTHONPYCACHEPREFIX``, a folder under the temp dir, even where ``PYTHONDONTWRITEBYTECODE`` is set);
``--no-bytecode-cache`` runs it with the environment as it is. It prints files/s for each side, every
run, and the ratios: medvae/MONAI and first ingest/no-op re-ingest.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
SUMMARY = re.compile(r"ingested (\d+), rejected (\d+), skipped (\d+)")


@dataclass
class Runs:
    """Seconds per run for each side of one data set."""

    cli_first: list[float] = field(default_factory=list)
    cli_noop: list[float] = field(default_factory=list)
    lib_noop: list[float] = field(default_factory=list)
    monai: list[float] = field(default_factory=list)


def medvae_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m medvae``."""
    script = Path(sys.executable).with_name("medvae")
    return [str(script)] if script.exists() else [sys.executable, "-m", "medvae"]


def cli_env(bytecode_cache: bool) -> dict[str, str]:
    env = dict(os.environ)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "medvae-bench-pycache")
    return env


def run_cli(folder: Path, store: Path, env: dict[str, str], intensity: str) -> tuple[float, tuple[int, ...]]:
    """Seconds from launch to exit of ``medvae ingest folder --store store``, and its summary counts."""
    cmd = [*medvae_command(), "ingest", str(folder), "--store", str(store), "--set", f"intensity={intensity}"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - start
    m = SUMMARY.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return took, tuple(int(g) for g in m.groups())


def run_lib_noop(folder: Path, store: Path, intensity: str) -> tuple[float, int]:
    """Seconds of ``ingest()`` in this process over an already-ingested folder, and what it ingested."""
    from medvae.config import IngestConfig
    from medvae.data.ingest import ingest
    from medvae.data.store import Store

    cfg = IngestConfig.model_validate({"intensity": intensity})
    start = time.perf_counter()
    rep = ingest([folder], Store(store), cfg)
    return time.perf_counter() - start, rep.counts["ingested"]


def monai_loader(threads: int) -> Callable[[str], object]:
    """MONAI's transform chain, with torch's intra-op threads set to ``threads`` (0: torch's default)."""
    import torch
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize

    if threads:
        torch.set_num_threads(threads)
    return Compose([LoadImage(image_only=True), EnsureChannelFirst(), Resize((64, 64))])


def run_monai(files: list[Path], load: Callable[[str], object]) -> tuple[float, int]:
    ok = 0
    start = time.perf_counter()
    for f in files:
        try:
            img = load(str(f))
            ok += int(tuple(img.shape[-2:]) == (64, 64))  # type: ignore[attr-defined]
        except Exception:  # broken fixtures: MONAI's loop would crash; count and go on
            pass
    return time.perf_counter() - start, ok


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def subset(root: Path, limit: int | None, dst: Path) -> Path:
    """``root`` itself, or a copy in ``dst`` of its first ``limit`` image files (with their label folders)."""
    if not limit:
        return root
    for f in image_files(root)[:limit]:
        (dst / f.parent.relative_to(root)).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / f.relative_to(root))
    return dst


def bench(name: str, root: Path, a: argparse.Namespace, env: dict[str, str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="medvae-bench-"))
    try:
        folder = subset(root, a.limit, work / "subset")
        files = image_files(folder)
        load = monai_loader(a.monai_threads)
        # Fills the bytecode cache, pool workers' modules too (enough files for the pool to start).
        run_cli(subset(root, 256, work / "warm-up"), work / "warm-up-store", env, a.intensity)
        run_monai(files[:8], load)
        runs = Runs()
        for r in range(a.repeats):
            store = work / f"store-{r}"
            t, first = run_cli(folder, store, env, a.intensity)
            runs.cli_first.append(t)
            t, again = run_cli(folder, store, env, a.intensity)
            runs.cli_noop.append(t)
            if again[0] != 0 or again[2] != first[0] + first[2]:
                raise SystemExit(f"{name}: the re-ingest was no no-op: {first} then {again}")
            t, n = run_lib_noop(folder, store, a.intensity)
            if n:
                raise SystemExit(f"{name}: the in-process re-ingest ingested {n} files")
            runs.lib_noop.append(t)
            t, n_monai = run_monai(files, load)
            runs.monai.append(t)
        report(name, len(files), first, n_monai, runs, a.intensity)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    name: str, n: int, counts: tuple[int, ...], n_monai: int, runs: Runs, intensity: str
) -> None:
    def rates(ts: list[float]) -> str:
        return ", ".join(f"{n / t:.1f}" for t in ts)

    def secs(ts: list[float]) -> str:
        return ", ".join(f"{t:.3f}" for t in ts)

    speed = [m / c for c, m in zip(runs.cli_first, runs.monai, strict=True)]
    noop = [f / z for f, z in zip(runs.cli_first, runs.cli_noop, strict=True)]
    lib = [f / z for f, z in zip(runs.cli_first, runs.lib_noop, strict=True)]
    print(f"{name}: intensity={intensity}; {n} image files; medvae ingested {counts[0]}, rejected "
          f"{counts[1]}, skipped {counts[2]} (same content); MONAI loaded {n_monai}")
    print(f"{name}: medvae ingest (CLI, with start-up) files/s: {rates(runs.cli_first)}")
    print(f"{name}: MONAI LoadImage+Resize loop files/s:     {rates(runs.monai)}")
    print(f"{name}: ratio medvae/MONAI per run: {', '.join(f'{x:.2f}' for x in speed)}; "
          f"median {statistics.median(speed):.2f}x")
    print(f"{name}: first ingest (CLI) s: {secs(runs.cli_first)}; no-op re-ingest (CLI) s: "
          f"{secs(runs.cli_noop)}; no-op re-ingest (in-process ingest()) s: {secs(runs.lib_noop)}")
    print(f"{name}: ratio first/no-op per run, CLI: {', '.join(f'{x:.1f}' for x in noop)} (median "
          f"{statistics.median(noop):.1f}x); in-process: {', '.join(f'{x:.1f}' for x in lib)} (median "
          f"{statistics.median(lib):.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kermany", type=Path, default=SHARED / "kermany_train")
    ap.add_argument("--dicom", type=Path, default=None, help="Also a DICOM folder (e.g. dicom_fixtures).")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N image files of each set.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--intensity",
        default="clahe",
        help="medvae's intensity standardisation: clahe (the shipped default: MONAI's loop does no such "
        "step) or none (decode and resize, what the MONAI loop does)",
    )
    ap.add_argument(
        "--monai-threads",
        type=int,
        default=1,
        help="torch threads for the MONAI loop (0: torch's default, one per core, which was measured 4-5x "
        "slower than 1 on the shared, loaded 2-core machine: its threads spin for a core)",
    )
    ap.add_argument(
        "--no-bytecode-cache", action="store_true", help="Run the CLI in this environment as is."
    )
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    env = cli_env(not a.no_bytecode_cache)
    print(
        f"{os.cpu_count()} cores; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"MONAI loop on {a.monai_threads or 'the default number of'} torch thread(s)"
    )
    bench("kermany_train", a.kermany, a, env)
    if a.dicom is not None:
        bench("dicom", a.dicom, a, env)


if __name__ == "__main__":
    main()
