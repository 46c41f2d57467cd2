#!/usr/bin/env python3
"""Ingest scaling on Dask: the real ingest flow on a local Dask cluster with 1 and with 2 workers.

Usage: python benchmarks/ingest_dask_scaling.py [--kermany DIR] [--files N] [--batch-files B] [--repeats R]
       [--workers 1,2] [--intensity clahe|none]

Each run ingests the same N real chest X-rays into a fresh store through `flows.ingest.ingest_flow` with
`runner.kind=dask` pointed at a `distributed.LocalCluster` of W single-threaded worker processes, so the
figures include Prefect's per-task overhead, the staging files and the one commit. The embedded default
(`runner.kind=local`, medvae's own process pool on every core) runs too, as the single-machine reference.
Runs alternate (W=1, W=2, local, W=1, ...) so machine noise hits all of them; the best of R is reported,
with the 2-worker/1-worker ratio measured in this one run. It also times the phases of one batched
ingest in one process (plan, decode, commit) so that the serial share, which bounds scaling, is visible.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kermany", type=Path, default=SHARED / "kermany_train")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--batch-files", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--intensity", default="clahe", choices=["clahe", "none", "equalize"])
    a = ap.parse_args()

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401
    from flows.ingest import ingest_flow
    from medvae.data.walk import iter_files

    logging.getLogger("prefect").setLevel(logging.WARNING)
    files = sorted(str(p) for p, err in iter_files([a.kermany]) if err is None and p.suffix == ".jpeg")
    files = files[: a.files]
    sizes = [int(w) for w in a.workers.split(",")]
    cfg = {"intensity": a.intensity}
    best: dict[str, float] = {}
    with prefect_test_harness(server_startup_timeout=120):
        clusters = {
            w: LocalCluster(
                n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
            )
            for w in sizes
        }
        try:
            for c in clusters.values():  # warm: workers import medvae and prefect once, not in the timing
                c.get_client().run(lambda: __import__("flows.ingest"))
            for rep in range(a.repeats):
                for name in [*(f"dask-{w}" for w in sizes), "local"]:
                    tmp = Path(tempfile.mkdtemp(prefix="medvae-dask-bench-"))
                    runner = (
                        {"kind": "local"}
                        if name == "local"
                        else {
                            "kind": "dask",
                            "address": clusters[int(name.split("-")[1])].scheduler_address,
                            "batch_files": a.batch_files,
                        }
                    )
                    start = time.perf_counter()
                    res = ingest_flow(files, str(tmp / "store"), cfg, None, runner)
                    sec = time.perf_counter() - start
                    shutil.rmtree(tmp, ignore_errors=True)
                    assert res["ingested"] + res["skipped"] == len(files), res  # Kermany repeats 5 files
                    rate = len(files) / sec
                    best[name] = max(best.get(name, 0.0), rate)
                    print(f"repeat {rep} {name:>7}: {sec:6.1f} s  {rate:7.1f} files/s", flush=True)
        finally:
            for c in clusters.values():
                c.close()
    phases = phase_times(files, cfg, a.batch_files)
    print(
        f"\n{len(files)} Kermany JPEGs, intensity={a.intensity}, batch_files={a.batch_files}, "
        f"best of {a.repeats}"
    )
    for name, rate in best.items():
        print(f"  {name:>7}: {rate:7.1f} files/s")
    if len(sizes) >= 2:
        lo, hi = f"dask-{sizes[0]}", f"dask-{sizes[-1]}"
        print(f"  scaling {hi}/{lo}: {best[hi] / best[lo]:.2f}x")
    total = sum(phases.values())
    print(
        "  phases of one batched ingest in one process (no Prefect): "
        + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in phases.items())
    )
    print(
        f"  per file: decode {phases['decode'] / len(files) * 1e3:.2f} ms, serial plan+commit "
        f"{(phases['plan'] + phases['commit']) / len(files) * 1e3:.3f} ms"
    )


def phase_times(files: list[str], cfg: dict[str, str], batch_files: int) -> dict[str, float]:
    """Seconds for plan, decode (all batches, one process) and commit: the serial share bounds scaling."""
    from medvae.config import IngestConfig
    from medvae.data.ingest import commit_batches, decode_batch, prepare_batches
    from medvae.data.staging import staging_uri
    from medvae.data.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="medvae-dask-phases-"))
    try:
        store, icfg = Store(tmp / "store"), IngestConfig.model_validate(cfg)
        staging = staging_uri(store.uri, "phases")
        t0 = time.perf_counter()
        plan = prepare_batches([Path(f) for f in files], store, icfg, staging, batch_files)
        t1 = time.perf_counter()
        for i in range(plan["batches"]):
            decode_batch(staging, i, store, icfg)
        t2 = time.perf_counter()
        commit_batches(staging, store, icfg)
        t3 = time.perf_counter()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"plan": t1 - t0, "decode": t2 - t1, "commit": t3 - t2}


if __name__ == "__main__":
    main()
