#!/usr/bin/env python3
"""Training step time of medvae's production train step in 1 and N processes (DDP), at a fixed global batch.

Each configuration runs as its own ``torchrun --standalone --nproc_per_node K`` launch of this script in
worker mode; K = 1 is the plain single-process path (no process group, no DDP), K = N the DDP path with
the global batch split N ways. Every rank times the same steps after a warm-up; the step time is rank 0's
wall time over the timed steps (it includes waiting for the slowest rank and the gradient all-reduce).

On a CPU box the comparison is fair in cores: by default each of K processes gets cores // K threads,
so 1 process uses every core through intra-op threads and N processes one core's share each.

Examples::

    # CPU (gloo): 1 vs 2 processes (per-process BatchNorm; synchronised BatchNorm needs CUDA)
    python benchmarks/ddp_step_time.py --nproc 2
    # one node of GPUs (NCCL)
    python benchmarks/ddp_step_time.py --device cuda --nproc 8 --batch 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: build the production training setup and time ``args.steps`` train steps."""
    import torch

    from medvae.config import ModelConfig, TrainConfig
    from medvae.engine import strategy as distributed
    from medvae.engine.data import seed_everything, uint8_to_float
    from medvae.engine.device import configure_backends
    from medvae.engine.loop import build_engine, train_step

    channels = tuple(int(c) for c in args.channels.split(","))
    cfg = TrainConfig(
        model=ModelConfig(image_size=args.image_size, channels=channels, latent_dim=args.latent),
        batch_size=args.batch,
        device=args.device,
        sync_batchnorm=args.sync_batchnorm,
    )
    with distributed.session(cfg.device) as strategy:
        device, world, rank = strategy.device, strategy.world_size, strategy.rank
        b = distributed.per_rank_batch(cfg.batch_size, world)
        configure_backends(device)
        seed_everything(0)
        engine = build_engine(cfg, strategy)
        g = torch.Generator().manual_seed(rank)
        pool = torch.randint(0, 256, (4 * b, 1, args.image_size, args.image_size), generator=g)
        pool = pool.to(torch.uint8).to(device)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            strategy.barrier()

        step_ms: list[float] = []
        start = time.perf_counter()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync()
                start = time.perf_counter()
            t0 = time.perf_counter()
            x = uint8_to_float(pool[(i % 4) * b : (i % 4 + 1) * b], engine.channels_last)
            train_step(engine, x, None, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
        sync()
        total = time.perf_counter() - start
        if rank == 0:
            res = {
                "nproc": world,
                "device": str(device.type),
                "threads_per_proc": torch.get_num_threads(),
                "global_batch": cfg.batch_size,
                "per_rank_batch": b,
                "sync_batchnorm": args.sync_batchnorm if world > 1 else "n/a",
                "ms_per_step": total / args.steps * 1e3,
                "median_step_ms": statistics.median(step_ms[args.warmup :]),
                "img_per_s": cfg.batch_size * args.steps / total,
            }
            print("RESULT " + json.dumps(res), flush=True)


def launch(args: argparse.Namespace, nproc: int, sync_bn: str, threads: int | None = None) -> dict[str, Any]:
    """Run one configuration under torchrun and return rank 0's result.

    ``threads`` (CPU only): intra-op threads per process; default ``--threads`` or cores // nproc.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        f"--device={args.device}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--channels={args.channels}",
        f"--latent={args.latent}",
        f"--image-size={args.image_size}",
        f"--sync-batchnorm={sync_bn}",
    ]
    env = dict(os.environ)
    if args.device == "cpu":
        threads = threads or args.threads or max(1, (os.cpu_count() or 1) // nproc)
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"no result from {nproc} process(es) (exit code {proc.returncode})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with 1")
    p.add_argument("--batch", type=int, default=64, help="global batch size (cfg.batch_size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--channels", default="32,64,128,256", help="model.channels (default: production)")
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--sync-batchnorm",
        default="auto",
        help="auto | on | off, or a comma list to compare (N > 1 only; on needs CUDA)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default cores // K)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.nproc < 2:
        raise SystemExit("--nproc must be at least 2 to compare with one process")
    rows = [launch(args, 1, "auto")]
    per_rank_threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    if args.device == "cpu" and rows[0]["threads_per_proc"] != per_rank_threads:
        # Also one process with one rank's share of the cores: the scaling efficiency of DDP itself.
        rows.append(launch(args, 1, "auto", threads=per_rank_threads))
    for mode in args.sync_batchnorm.split(","):
        rows.append(launch(args, args.nproc, mode.strip()))
    print(f"device {args.device}, {os.cpu_count()} cores, global batch {args.batch}, {args.steps} steps")
    head = f"{'procs':>5} {'thr/proc':>8} {'batch/rank':>10} {'syncBN':>6} {'ms/step':>8} {'median':>7} "
    print(head + f"{'img/s':>7} {'vs 1 proc':>9}")
    base = rows[0]["img_per_s"]
    for r in rows:
        print(
            f"{r['nproc']:>5} {r['threads_per_proc']:>8} {r['per_rank_batch']:>10} {r['sync_batchnorm']:>6} "
            f"{r['ms_per_step']:>8.1f} {r['median_step_ms']:>7.1f} {r['img_per_s']:>7.0f} "
            f"{r['img_per_s'] / base:>8.2f}x"
        )


if __name__ == "__main__":
    main()
