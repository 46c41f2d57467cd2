#!/usr/bin/env python3
"""Training throughput of medvae's production train step, optionally against the tutorial reference loop."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from medvae.config import TrainConfig
from medvae.engine.data import seed_everything
from medvae.engine.device import configure_backends, select_device
from medvae.engine.loop import build_engine, run_epoch
from medvae.engine.strategy import Local

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "seed_reference_train.py"

EpochFn = Callable[[float | None], int]


def load_reference(path: Path = REFERENCE) -> ModuleType | None:
    """Import the reference script by path, or return None when it is not there.

    Args:
        path: the reference script.

    Returns:
        The imported module (its ``main`` is not run).
    """
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("seed_reference_train", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_epoch_fn(ref: ModuleType, data: torch.Tensor, device: str, batch: int) -> EpochFn:
    """The reference's training loop, bound to its own model, DataLoader and optimizer.

    The script keeps its loop inside ``main()``, so the body below is its ``epoch(limit)`` verbatim
    (SeedVAE, DataLoader over a TensorDataset with a per-batch copy to the device, BCE-sum + KL, Adam,
    one ``.item()`` sync per step), using the script's own ``SeedVAE`` class.
    """
    loader = DataLoader(TensorDataset(data), batch_size=batch, shuffle=True)
    model = ref.SeedVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch(limit: float | None) -> int:
        seen, start = 0, time.perf_counter()
        for (x,) in loader:
            x = x.to(device)
            recon, mu, logvar = model(x)
            loss = F.binary_cross_entropy(recon, x, reduction="sum") - 0.5 * torch.sum(
                1 + logvar - mu.pow(2) - logvar.exp()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            seen += len(x)
            if limit is not None and time.perf_counter() - start > limit:
                break
        return seen

    return epoch


def medvae_epoch_fn(
    data_u8: torch.Tensor, cfg: TrainConfig, *, layout: str = "auto", amp: str = "auto"
) -> tuple[EpochFn, str]:
    """medvae's production epoch (``engine.loop.run_epoch``), set up exactly as ``train_vae`` does it.

    Returns:
        The epoch function and a one-line description of the execution settings.
    """
    local = Local(select_device(cfg.device))
    configure_backends(local.device)  # as train_vae does
    seed_everything(cfg.seed)
    channels_last = {"auto": None, "contiguous": False, "channels_last": True}[layout]
    engine = build_engine(cfg, local, channels_last=channels_last, amp=amp)  # type: ignore[arg-type]
    images = data_u8.to(local.device)  # the one host->device copy
    epoch_no = [0]

    def epoch(limit: float | None) -> int:
        epoch_no[0] += 1
        stats = run_epoch(
            engine,
            images,
            None,
            local,
            epoch=epoch_no[0],
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            kl_w=1.0,
            time_limit=limit,
        )
        return stats.images

    desc = (
        f"device={local.device.type} batch={cfg.batch_size} latent={cfg.model.latent_dim} "
        f"channels_last={engine.channels_last} amp={engine.amp_dtype} compile={cfg.compile} "
        f"threads={torch.get_num_threads()}"
    )
    return epoch, desc


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    runs: dict[str, EpochFn], seconds: float, slice_s: float, device: str, warmup_s: float | None = None
) -> dict[str, tuple[int, float, list[float]]]:
    """Warm each loop up, then alternate time slices until each has ``seconds`` of training.

    The warm-up is ``warmup_s`` seconds of training (at least one step, so that ``torch.compile``
    compiles and oneDNN/cuDNN build their kernels before the clock runs), or a whole epoch when None:
    on a busy 2-core machine an epoch of 4096 images took minutes and measured nothing. Alternating
    slices exposes every loop to the same background load on a shared machine. Each slice starts a
    fresh (shuffled) epoch that stops after the first step past its time limit, which is what the
    reference does on its own.

    Returns:
        name → (images, seconds, per-slice img/s).
    """
    for name, fn in runs.items():
        t = time.perf_counter()
        fn(warmup_s)
        _sync(device)
        print(f"warm-up epoch {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    totals: dict[str, tuple[int, float, list[float]]] = {name: (0, 0.0, []) for name in runs}
    while min(s for _, s, _ in totals.values()) < seconds:
        for name, fn in runs.items():
            seen, spent, rates = totals[name]
            if spent >= seconds:
                continue
            start = time.perf_counter()
            n = fn(min(slice_s, seconds - spent))
            _sync(device)
            dt = time.perf_counter() - start
            totals[name] = (seen + n, spent + dt, [*rates, n / dt])
    return totals


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark and print ``medvae img/s``, ``reference img/s`` and ``ratio``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed training per loop, after warm-up")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=None, help="medvae batch size (default: TrainConfig's)")
    ap.add_argument(
        "--latent",
        type=int,
        default=None,
        help="medvae latent size (default: TrainConfig's, the shipped 128; 32 is the reference's own)",
    )
    ap.add_argument("--ref-batch", type=int, default=128, help="reference batch size (its own default)")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model on/off (default: TrainConfig.compile, the shipped setting)",
    )
    ap.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the tutorial reference loop, interleaved, and report the ratio (default: on)",
    )
    ap.add_argument("--slice", type=float, default=2.0, help="seconds per alternating slice with --reference")
    ap.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="untimed seconds of training per loop before timing (at least one step); <= 0: one epoch",
    )
    ap.add_argument(
        "--layout",
        choices=["auto", "contiguous", "channels_last"],
        default="auto",
        help="experiment: force medvae's memory format (auto: what train_vae uses)",
    )
    ap.add_argument(
        "--amp",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="experiment: force medvae's autocast (auto: what train_vae uses)",
    )
    a = ap.parse_args(argv)

    # The shipped defaults (TrainConfig()) unless an option overrides them.
    overrides: dict[str, object] = {"device": a.device}
    if a.compile is not None:
        overrides["compile"] = a.compile
    if a.latent is not None:
        overrides["model"] = {"latent_dim": a.latent}
    if a.batch is not None:
        overrides["batch_size"] = a.batch
    cfg = TrainConfig.model_validate(overrides)
    device = select_device(cfg.device).type

    # The same data as the reference: torch.rand images from seed 0, stored as uint8 like the store does.
    torch.manual_seed(0)
    data = torch.rand(a.images, 1, 64, 64)
    data_u8 = (data * 255).round().to(torch.uint8)

    runs: dict[str, EpochFn] = {}
    ref = load_reference() if a.reference else None
    if a.reference and ref is None:
        print(f"reference not found at {REFERENCE}; timing medvae only", flush=True)
    if ref is not None:
        runs["reference"] = reference_epoch_fn(ref, data, device, a.ref_batch)
    med, desc = medvae_epoch_fn(data_u8, cfg, layout=a.layout, amp=a.amp)
    runs["medvae"] = med
    print(f"medvae settings: {desc}; reference batch={a.ref_batch}", file=sys.stderr, flush=True)

    slice_s = a.slice if ref is not None else a.seconds
    totals = measure(runs, a.seconds, slice_s, device, a.warmup if a.warmup > 0 else None)
    rate = {name: n / s for name, (n, s, _) in totals.items()}
    print(f"medvae img/s: {rate['medvae']:.1f}")
    if ref is not None:
        per_slice = [m / r for m, r in zip(totals["medvae"][2], totals["reference"][2], strict=False)]
        print(f"reference img/s: {rate['reference']:.1f}")
        print(f"ratio: {rate['medvae'] / rate['reference']:.3f}")
        print(
            f"per-slice ratios: median {statistics.median(per_slice):.3f}, "
            f"min {min(per_slice):.3f}, max {max(per_slice):.3f} over {len(per_slice)} slice pairs",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
