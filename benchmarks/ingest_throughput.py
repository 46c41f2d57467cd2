#!/usr/bin/env python3
"""Ingest throughput: medvae's ingest against a loop of MONAI LoadImage + Resize, measured in one run.

Usage: python benchmarks/ingest_throughput.py [--kermany DIR] [--dicom DIR] [--limit N] [--repeats R]
       [--intensity none|clahe]

For each data set it prints files/s for `medvae.data.ingest.ingest` (decode, de-identify, normalise to
64×64 and commit one Delta version, on every core) and for the obvious alternative, a single loop of MONAI's
`LoadImage` + `EnsureChannelFirst` + `Resize((64, 64))` (no store write, so the comparison favours MONAI),
and the ratio between the two. Runs alternate (medvae, MONAI, medvae, ...) so machine noise hits both.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from medvae.config import IngestConfig
from medvae.data.ingest import ingest as medvae_ingest
from medvae.data.store import Store
from medvae.data.walk import iter_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def files_of(root: Path, limit: int | None) -> list[Path]:
    files = [
        p
        for p, err in iter_files([root])
        if err is None and p.suffix.lower() in {".jpeg", ".jpg", ".png", ".dcm"}
    ]
    return files[:limit] if limit else files


def run_medvae(files: list[Path], intensity: str) -> tuple[float, int]:
    tmp = Path(tempfile.mkdtemp(prefix="medvae-bench-"))
    try:
        start = time.perf_counter()
        cfg = IngestConfig.model_validate({"intensity": intensity})
        rep = medvae_ingest(files, Store(tmp / "store"), cfg)
        return time.perf_counter() - start, rep.counts["ingested"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_monai(files: list[Path]) -> tuple[float, int]:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize

    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Resize((64, 64))])
    ok = 0
    start = time.perf_counter()
    for f in files:
        try:
            img = load(str(f))
            ok += int(img.shape[-2:] == (64, 64))
        except Exception:  # broken fixtures: MONAI's loop would crash; count and go on
            pass
    return time.perf_counter() - start, ok


def bench(name: str, files: list[Path], repeats: int, intensity: str) -> None:
    med, mon = [], []
    for _ in range(repeats):
        t, n_med = run_medvae(files, intensity)
        med.append(len(files) / t)
        t, n_mon = run_monai(files)
        mon.append(len(files) / t)
    m, r = max(med), max(mon)
    print(f"{name}: intensity={intensity}; {len(files)} files; medvae ingested {n_med}, MONAI loaded {n_mon}")
    print(f"{name}: medvae files/s: {m:.1f} (runs {', '.join(f'{x:.1f}' for x in med)})")
    print(f"{name}: MONAI LoadImage+Resize files/s: {r:.1f} (runs {', '.join(f'{x:.1f}' for x in mon)})")
    print(f"{name}: ratio medvae/MONAI: {m / r:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kermany", type=Path, default=SHARED / "kermany_train")
    ap.add_argument("--dicom", type=Path, default=SHARED / "dicom_fixtures")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N files of each set.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--intensity",
        default="none",
        help="medvae's intensity standardisation: none (default) does what the MONAI loop does, decode and "
        "resize; clahe is the shipped default and adds CLAHE to every image, which MONAI's loop does not do",
    )
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    bench("kermany_train", files_of(a.kermany, a.limit), a.repeats, a.intensity)
    bench("dicom_fixtures", files_of(a.dicom, a.limit), a.repeats, a.intensity)


if __name__ == "__main__":
    main()
