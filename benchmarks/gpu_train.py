#!/usr/bin/env python3
"""medvae training on one GPU: loss parity with the CPU, production and fast-path img/s, the tutorial ratio.

One script, runnable with Python, torch, NumPy, pydantic and PyYAML (medvae.config reads the last two):
it imports only ``medvae.config``, ``medvae.engine`` and ``medvae.vae``, never MONAI, pydicom, Prefect,
deltalake or rich (``tests/engine/test_gpu_train.py`` runs it with those blocked). It prints progress to
stderr and ONE JSON line to stdout. Steps:

1. **Parity.** medvae's default model (``TrainConfig()``: latent 128, batch 64, lr 1e-3) trained through
   the production engine (``build_engine`` + ``train_step``: bf16 autocast and channels-last on CUDA)
   for ``--check-steps`` steps on fixed synthetic phantoms, same seed, same initial weights, same
   batches and (``--parity-noise shared``, the default) the same reparameterisation noise, drawn on the
   CPU, on the CPU (fp32) and on ``--device``. The two loss curves are smoothed over ``--check-window``
   steps and must agree within ``--check-rtol`` (relative, at every smoothed point): what is left is
   arithmetic (bf16 autocast, cuDNN's algorithms, TF32), which moves a curve by well under 1% over the
   first 60 steps (calibrated on the CPU with ``--calibrate``: fp32 against bf16 autocast, see
   ``docs/distributed_training.md``). The 3% default leaves room for the GPU's own kernels; a real defect
   (a loss that is not autocast-safe, a lost gradient, a wrong layout) moves it by far more.
2. **Production engine** at the shipped defaults (batch 64): ``run_epoch`` img/s, as ``train_vae`` runs.
3. **Fast path**: the same model and loss with every lever as an option: uint8 data resident on the
   device with shuffling and augmentation there (``--resident``, ``--augment``), a large batch
   (``--batch``) with a learning-rate rule (``--lr-rule`` sqrt or linear scaling from batch 64, linear
   warm-up over ``--warmup-steps``), bf16 autocast (``--amp``), channels-last, fused Adam
   (``--fused-adam``), ``torch.compile`` (``--compile``) and CUDA graphs (``--cuda-graphs``,
   torch.compile's ``reduce-overhead`` mode); no host sync inside a timing chunk.
4. **Reference**: the tutorial loop (``--reference``, default ``../shared/bench/seed_reference_train.py``
   beside the repository) as a subprocess on the same device, and the ratios fast path / reference and
   production / reference. Goal >= 10x; moonshot 250k img/s on an H100-class GPU, which at 0.31 GFLOP
   per training image is 78 TFLOP/s. On the CPU (a smoke test of the script) it runs only with
   ``--compare``.

Examples::

    python benchmarks/gpu_train.py                              # cuda: everything, about 3-5 minutes
    python benchmarks/gpu_train.py --batch 8192 --cuda-graphs   # more levers
    python benchmarks/gpu_train.py --device cpu --seconds 5     # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a plain checkout is enough: medvae need not be installed

from medvae.config import TrainConfig  # noqa: E402
from medvae.engine.data import apply_augment, seed_everything, uint8_to_float  # noqa: E402
from medvae.engine.device import autocast, autocast_dtype, configure_backends  # noqa: E402
from medvae.engine.loop import build_engine, run_epoch, train_step  # noqa: E402
from medvae.engine.strategy import Local  # noqa: E402
from medvae.vae.losses import negative_elbo  # noqa: E402
from medvae.vae.model import ConvVAE  # noqa: E402

REFERENCE = REPO.parent / "shared" / "bench" / "seed_reference_train.py"
GFLOP_PER_IMAGE = 0.31  # forward + backward of the default model on one 64x64 image
BASE_BATCH = 64  # TrainConfig's batch, at which lr=1e-3 was tuned


def log(msg: str) -> None:
    """Progress to stderr; stdout carries only the JSON line."""
    print(msg, file=sys.stderr, flush=True)


def phantoms(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 (n, 1, size, size) images of 1-3 bright ellipses on a dark, smooth background.

    Learnable structure (the loss falls by far more than the noise between two runs), deterministic
    from ``seed`` on the CPU, the same on every machine.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 0.15 + 0.1 * (xx[None] * torch.rand(n, 1, 1, generator=g))
    for _ in range(3):
        cx, cy = (torch.rand(2, n, 1, 1, generator=g) - 0.5) * 1.2
        ax, ay = 0.1 + 0.3 * torch.rand(2, n, 1, 1, generator=g)
        level = 0.3 + 0.6 * torch.rand(n, 1, 1, generator=g)
        on = (torch.rand(n, 1, 1, generator=g) < 0.8).float()
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
        img = torch.where(inside, torch.maximum(img, level * on + img * (1 - on)), img)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)


@contextlib.contextmanager
def shared_noise(seed: int | None) -> Iterator[None]:
    """Within the block, the VAE's reparameterisation noise comes from one CPU generator (``seed``).

    Every device then draws the same ε for the same step, so two devices' loss curves differ by their
    arithmetic alone. ``None`` leaves the model's own (device) generator in place.
    """
    if seed is None:
        yield
        return
    g = torch.Generator().manual_seed(seed)
    original = ConvVAE.__dict__["reparameterize"]  # the staticmethod object itself, to put back as is

    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=g).to(mu.device, mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    ConvVAE.reparameterize = staticmethod(reparameterize)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ConvVAE.reparameterize = original  # type: ignore[method-assign]


def loss_curve(
    cfg: TrainConfig, data: torch.Tensor, device: str, steps: int, amp: str, noise: int | None
) -> list[float]:
    """Per-step training losses of the production engine (``train_step``) on ``device``.

    ``build_engine`` initialises the model on the CPU from ``cfg.seed`` and then moves it, so every
    device starts from the same weights. The batches are ``data`` in a fixed order, ``cfg.batch_size``
    at a time; ``noise`` is the shared-noise seed (:func:`shared_noise`) or None for the device's own
    generator.
    """
    local = Local(torch.device(device))
    configure_backends(local.device)
    seed_everything(cfg.seed)
    engine = build_engine(cfg, local, amp=amp)  # type: ignore[arg-type]
    images = data.to(local.device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).to(local.device)
    b, losses = cfg.batch_size, []
    with shared_noise(noise):
        for k in range(steps):
            start = (k * b) % (len(data) - b + 1)
            x = uint8_to_float(images.index_select(0, order[start : start + b]), engine.channels_last)
            losses.append(train_step(engine, x, None, 1.0)[0])
    return torch.stack(losses).float().cpu().tolist()


def smooth(v: list[float], w: int) -> list[float]:
    """Trailing means over ``w`` points (from the ``w``-th point on)."""
    return [sum(v[i - w : i]) / w for i in range(w, len(v) + 1)]


def parity(a: argparse.Namespace, cfg: TrainConfig, emulate: bool = False) -> dict[str, Any]:
    """Compare the production engine's loss curve on ``a.device`` with the CPU's (module doc, step 1).

    ``emulate`` (``--calibrate``): the CPU in fp32 against the CPU under bf16 autocast, which is how the
    size of the arithmetic's effect was measured without a GPU.
    """
    data = phantoms(max(512, cfg.batch_size * 8))
    noise = cfg.seed + 1 if a.parity_noise == "shared" else None
    t = time.perf_counter()
    cpu = loss_curve(cfg, data, "cpu", a.check_steps, "off", noise)
    device, amp = ("cpu", "bf16") if emulate else (a.device, a.amp)
    dev = loss_curve(cfg, data, device, a.check_steps, amp, noise)
    s_cpu, s_dev = smooth(cpu, a.check_window), smooth(dev, a.check_window)
    rel = [abs(x - y) / abs(x) for x, y in zip(s_cpu, s_dev, strict=True)]
    res = {
        "steps": a.check_steps,
        "window": a.check_window,
        "rtol": a.check_rtol,
        "noise": a.parity_noise,
        "amp": amp,
        "max_rel_dev": max(rel),
        "final_rel_dev": rel[-1],
        "max_rel_dev_unsmoothed": max(abs(x - y) / abs(x) for x, y in zip(cpu, dev, strict=True)),
        "cpu_first_last": [cpu[0], s_cpu[-1]],
        "device_first_last": [dev[0], s_dev[-1]],
        "loss_drop": 1 - s_cpu[-1] / cpu[0],
        "passed": max(rel) <= a.check_rtol,
        "seconds": time.perf_counter() - t,
    }
    log(
        f"parity: max smoothed deviation {max(rel):.4f} (tolerance {a.check_rtol}), "
        f"loss {cpu[0]:.0f} -> {s_cpu[-1]:.0f}"
    )
    return res


def production(cfg: TrainConfig, device: str, seconds: float, n: int) -> dict[str, Any]:
    """img/s of the production ``run_epoch`` at ``cfg`` (the shipped defaults), after a short warm-up."""
    local = Local(torch.device(device))
    configure_backends(local.device)
    seed_everything(cfg.seed)
    engine = build_engine(cfg, local)
    images = phantoms(n).to(local.device)
    kw: dict[str, Any] = {"seed": cfg.seed, "batch_size": cfg.batch_size, "kl_w": 1.0}
    run_epoch(engine, images, None, local, epoch=0, time_limit=min(seconds, 2.0), **kw)  # warm-up
    seen, spent, epoch = 0, 0.0, 1
    while spent < seconds:
        t = time.perf_counter()
        seen += run_epoch(engine, images, None, local, epoch=epoch, time_limit=seconds - spent, **kw).images
        spent += time.perf_counter() - t  # run_epoch ends with a host read: the device queue is drained
        epoch += 1
    log(f"production engine, batch {cfg.batch_size}: {seen / spent:.0f} img/s")
    return {"batch": cfg.batch_size, "img_per_s": seen / spent, "amp": str(engine.amp_dtype)}


def lr_at(step: int, base: float, batch: int, rule: str, warmup: int, base_batch: int = BASE_BATCH) -> float:
    """The learning rate of a step: ``base`` scaled from ``base_batch`` to ``batch``, warmed up linearly.

    ``sqrt`` (the usual rule for Adam) multiplies by sqrt(batch / base_batch), ``linear`` by
    batch / base_batch, ``none`` keeps ``base``. The warm-up ramps from 1/warmup of it to all of it.
    """
    scale = {"sqrt": math.sqrt(batch / base_batch), "linear": batch / base_batch, "none": 1.0}[rule]
    return base * scale * min(1.0, (step + 1) / max(1, warmup))


class FastPath:
    """The default model's training step with every throughput lever (module docstring, step 3)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, a: argparse.Namespace) -> None:
        seed_everything(cfg.seed)
        configure_backends(device)
        self.cfg, self.device, self.a = cfg, device, a
        self.model = ConvVAE(cfg.model).to(device).to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=a.fused_adam)
        self.amp = autocast_dtype(device) if a.amp == "auto" else {"bf16": torch.bfloat16}.get(a.amp)
        self.loss_fn: Any = self._loss
        self.compiled = "off"
        if a.compile or a.cuda_graphs:
            # Forward and loss in one graph (the loss's reductions fuse too); the backward is compiled
            # with it. reduce-overhead replays both as CUDA graphs: one launch instead of hundreds.
            mode = "reduce-overhead" if a.cuda_graphs else "default"
            self.loss_fn, self.compiled = torch.compile(self._loss, mode=mode), mode
        # Shuffle and augmentation draw on the data's device: nothing per step crosses from the host.
        data_device = device if a.resident else torch.device("cpu")
        self.gen = torch.Generator(device=data_device).manual_seed(cfg.seed)
        self.images = phantoms(a.images).to(data_device)  # the one host-to-device copy: uint8, 4 KiB/image
        if not a.resident and device.type == "cuda":
            self.images = self.images.pin_memory()
        self.step_no, self.order, self.pos = 0, torch.empty(0, dtype=torch.long, device=data_device), 0

    def _batch(self) -> torch.Tensor:
        b, dev = self.a.batch, self.images.device
        if self.pos + b > self.order.numel():  # a new epoch: the permutation is drawn where the data is
            self.order = torch.randperm(len(self.images), generator=self.gen, device=dev)
            self.pos = 0
        u8 = self.images.index_select(0, self.order[self.pos : self.pos + b])
        if not self.a.resident:  # the lever's opposite: a uint8 batch from the host every step
            u8 = (u8.pin_memory() if self.device.type == "cuda" else u8).to(self.device, non_blocking=True)
        x = uint8_to_float(u8, True)
        self.pos += b
        if self.a.augment:
            shifts = torch.randint(-4, 5, (b, 2), generator=self.gen, device=dev).float()
            gains = 1.0 + (torch.rand(b, generator=self.gen, device=dev) * 2 - 1) * 0.1
            x = apply_augment(x, shifts, gains)
        return x

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            out = self.model(x)
        return negative_elbo(out, x, self.cfg.loss, 1.0).loss  # upcasts bf16 outputs itself

    def step(self) -> torch.Tensor:
        """One optimisation step; returns the detached loss on the device (no host sync)."""
        lr = lr_at(self.step_no, self.cfg.lr, self.a.batch, self.a.lr_rule, self.a.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr  # a Python float: fused Adam takes it as a kernel argument, no copy
        if self.a.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
        x = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x)
        loss.backward()
        self.opt.step()
        self.step_no += 1
        return loss.detach()

    def measure(self, seconds: float) -> dict[str, Any]:
        """img/s over ``seconds`` after ``--warmup-chunks`` untimed chunks (compilation, autotuning)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        chunk = self.a.chunk
        for _ in range(self.a.warmup_chunks * chunk):
            self.step()
        sync()
        total, steps, start = torch.zeros((), device=self.device), 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(chunk):  # the host runs ahead; one sync per chunk to read the clock
                total += self.step()
            steps += chunk
            sync()
        spent = time.perf_counter() - start
        rate = steps * self.a.batch / spent
        log(f"fast path, batch {self.a.batch}, compile {self.compiled}: {rate:.0f} img/s")
        return {
            "batch": self.a.batch,
            "img_per_s": rate,
            "tflops": rate * GFLOP_PER_IMAGE / 1e3,
            "lr_rule": self.a.lr_rule,
            "peak_lr": lr_at(10**9, self.cfg.lr, self.a.batch, self.a.lr_rule, 1),
            "compile": self.compiled,
            "augment": self.a.augment,
            "resident": self.a.resident,
            "fused_adam": self.a.fused_adam,
            "amp": str(self.amp),
            "mean_loss_timed": float(total) / max(steps, 1),
            "steps": self.step_no,
        }


def reference(path: Path, device: str, seconds: float, images: int) -> dict[str, Any]:
    """The tutorial loop as a subprocess on the same device: its own ``reference img/s`` line."""
    if not path.is_file():
        log(f"reference not found at {path}")
        return {"img_per_s": None, "error": f"not found: {path}"}
    cmd = [sys.executable, str(path), "--device", device, "--seconds", str(seconds), "--images", str(images)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    m = re.search(r"reference img/s:\s*([0-9.]+)", proc.stdout)
    if m is None:
        log(proc.stdout[-2000:] + proc.stderr[-2000:])
        return {"img_per_s": None, "error": f"exit code {proc.returncode}, no 'reference img/s' line"}
    log(f"reference (tutorial loop, batch 128): {float(m.group(1)):.0f} img/s")
    return {"img_per_s": float(m.group(1)), "batch": 128, "path": str(path)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; defaults depend on the device (a CPU run is a smoke test)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, flag = p.add_argument, argparse.BooleanOptionalAction
    add("--device", default="cuda", help="cuda, cuda:N or cpu")
    add("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    add("--batch", type=int, default=None, help="fast-path batch (default 4096 on cuda, 32 on cpu)")
    add("--lr-rule", choices=["sqrt", "linear", "none"], default="sqrt")
    add("--warmup-steps", type=int, default=200, help="learning-rate warm-up of the fast path")
    add("--images", type=int, default=None, help="fast-path data set (default 65536 cuda, 512 cpu)")
    add("--resident", action=flag, default=True, help="uint8 data, shuffle and augmentation on the device")
    add("--compile", action=flag, default=None, help="torch.compile the fast path (default: on for cuda)")
    add("--cuda-graphs", action="store_true", help="torch.compile mode reduce-overhead")
    add("--fused-adam", action=flag, default=True, help="Adam's fused kernel")
    add("--augment", action=flag, default=True, help="shifts and contrast gain, on the data's device")
    add("--amp", choices=["auto", "bf16", "off"], default="auto", help="auto: bf16 autocast on CUDA")
    add("--chunk", type=int, default=None, help="steps between clock reads (default 25 cuda, 2 cpu)")
    add("--warmup-chunks", type=int, default=None, help="untimed chunks first (default 8 cuda, 1 cpu)")
    add("--check-steps", type=int, default=None, help="parity steps (default 60 cuda, 4 cpu)")
    add("--check-window", type=int, default=10)
    add("--check-rtol", type=float, default=0.03)
    add("--parity-noise", choices=["shared", "device"], default="shared", help="see step 1")
    add("--reference", type=Path, default=REFERENCE, help="the tutorial loop script")
    add("--compare", action=flag, default=None, help="run the reference (default: on for cuda)")
    add("--ref-images", type=int, default=None, help="reference data set (default 4096 cuda, 512 cpu)")
    add("--calibrate", action="store_true", help="only the parity check, CPU fp32 vs CPU bf16")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")

    def pick(value: Any, on_cuda: Any, on_cpu: Any) -> Any:
        return (on_cuda if cuda else on_cpu) if value is None else value

    a.batch, a.images = pick(a.batch, 4096, 32), pick(a.images, 65536, 512)
    a.compile, a.compare = pick(a.compile, True, False), pick(a.compare, True, False)
    a.chunk, a.warmup_chunks = pick(a.chunk, 25, 2), pick(a.warmup_chunks, 8, 1)
    a.check_steps, a.ref_images = pick(a.check_steps, 60, 4), pick(a.ref_images, 4096, 512)
    a.check_window = min(a.check_window, max(1, a.check_steps // 2))
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the four steps and print the JSON line; returns it as a dict."""
    a = parse(argv)
    if a.calibrate:
        res = parity(a, TrainConfig(device="cpu"), emulate=True)
        print(json.dumps({"calibration": res}), flush=True)
        return res
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --device cpu for a smoke test")
    cfg = TrainConfig(device="cuda" if device.type == "cuda" else "cpu")  # the shipped defaults
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parity": parity(a, cfg),
        "production": production(cfg, a.device, a.seconds, n=4096 if device.type == "cuda" else 256),
    }
    try:
        out["fast"] = FastPath(cfg, device, a).measure(a.seconds)
    except Exception as exc:  # e.g. a compiler toolchain missing: report it, keep the other figures
        log(f"fast path failed: {exc!r}")
        out["fast"] = {"img_per_s": None, "error": repr(exc)[:300]}
    out["reference"] = reference(a.reference, a.device, a.seconds, a.ref_images) if a.compare else None
    ref = out["reference"]["img_per_s"] if out["reference"] else None
    fast, prod = out["fast"]["img_per_s"], out["production"]["img_per_s"]
    out["ratio_fast_vs_reference"] = fast / ref if ref and fast else None
    out["ratio_production_vs_reference"] = prod / ref if ref else None
    out["goal_10x"] = bool(out["ratio_fast_vs_reference"] and out["ratio_fast_vs_reference"] >= 10)
    out["moonshot_fraction_of_250k"] = fast / 250_000 if fast else None
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
