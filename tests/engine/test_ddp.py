"""Multi-process (DDP) training on the CPU with gloo: torchrun end to end, sharding, BatchNorm settings,
rank-0-only writes and resume across world sizes.

Two launches carry most of the file: one real ``medvae train --nproc 2`` (torchrun running
``-m medvae.train``) and one ``torch.multiprocessing.spawn`` of two ranks that run several library-level
scenarios in a row (process start-up, not training, is what costs time on a 2-core box).
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medvae.config import IngestConfig, LossConfig, ModelConfig, TrainConfig, load_config
from medvae.engine import strategy as distributed
from medvae.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, resumable_config
from medvae.engine.device import use_sync_batchnorm
from medvae.engine.strategy import Local, Torchrun, shard_epoch, strategy_for
from medvae.engine.trainer import train_vae
from medvae.vae.model import ConvVAE
from tests.engine.test_trainer import _noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two processes may differ from one only through BatchNorm statistics over half batches and their own
# reparameterisation noise. On this test's run the best validation losses differed by 0.05%, 0.33% and
# 0.12% (seeds 0, 1, 5), so 3% leaves a wide margin while a real defect (validation on one rank's half,
# a rank training on the wrong shard, gradients not averaged) shows as a larger gap or an exact check
# below.
QUALITY_RTOL = 0.03


def _child_env(mp: pytest.MonkeyPatch) -> None:
    """Environment for the rank processes: one thread each, and a bytecode cache where the venv has none.

    This environment sets PYTHONDONTWRITEBYTECODE. A venv installed without ``--compile-bytecode`` has
    no ``__pycache__``, so every new process compiles torch's Python source again (about 3 s per process
    here) and DDP's constructor imports torch._dynamo (5-7 s more). A cache outside the venv
    (PYTHONPYCACHEPREFIX) lets the ranks of later launches skip that. Where the venv has compiled
    bytecode (CI's install) the prefix must stay unset: Python would ignore ``__pycache__`` and compile
    everything into an empty cache (with a cold cache the launches took 38 s here, without it 19 s).
    """
    mp.setenv("OMP_NUM_THREADS", "1")
    if not (Path(torch.__file__).parent / "__pycache__").is_dir():
        mp.setenv("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "medvae-test-pycache"))
        mp.delenv("PYTHONDONTWRITEBYTECODE", raising=False)


def _strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in history]


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": ModelConfig(image_size=16, channels=(8, 16), latent_dim=4),
        "loss": LossConfig(kl_warmup_epochs=1),
        "epochs": 4,
        "batch_size": 8,
        "device": "cpu",
        "seed": 3,
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


# ------------------------------------------------------------------------------------ pure functions
def test_epoch_shards_make_up_the_single_process_batches() -> None:
    order = torch.randperm(45, generator=torch.Generator().manual_seed(0))
    single = [order[k : k + 8] for k in range(0, 45, 8)]  # 5 full batches and a last one of 5
    for world in (1, 2, 4):
        shards = [shard_epoch(order, 8, r, world) for r in range(world)]
        steps = shards[0][1]
        assert all(s[1] == steps for s in shards)  # every rank runs the same number of equal steps
        assert steps[:5] == [8 // world] * 5
        pos = 0
        for k, b in enumerate(steps):
            union = torch.cat([idx[pos : pos + b] for idx, _ in shards])
            if k < 5:
                assert torch.equal(union, single[k])  # global step k is one process's batch k
            else:  # the last batch of 5: split evenly, the odd one out sits out the epoch
                assert b == 5 // world and set(union.tolist()) <= set(single[5].tolist())
            pos += b
    # A tail of one image per rank is dropped (BatchNorm); with one process it is kept as one batch of 5.
    assert shard_epoch(order, 8, 0, 4)[1] == [2] * 5
    assert shard_epoch(order, 8, 0, 1)[1] == [8] * 5 + [5]
    # One process is the same function: Local's shard is the plain batching of the whole permutation.
    idx, steps = Local(torch.device("cpu")).shard(order, 8)
    assert torch.equal(idx, order) and steps == [8] * 5 + [5]
    assert shard_epoch(order[:41], 8, 0, 1)[1] == [8] * 5  # only a last batch of one image is dropped


def test_per_rank_batch_errors_are_clear() -> None:
    assert distributed.per_rank_batch(64, 2) == 32
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        distributed.per_rank_batch(64, 3)
    with pytest.raises(ValueError, match="BatchNorm needs at least 2"):
        distributed.per_rank_batch(4, 4)
    with pytest.raises(ValueError, match="too few for 4 processes"):
        distributed.per_rank_batch(8, 4, n_train=7)


def test_sync_batchnorm_setting() -> None:
    # YAML reads a bare on/off as a boolean; the setting must still mean on/off.
    assert load_config(TrainConfig, None, ["sync_batchnorm=on"]).sync_batchnorm == "on"
    assert load_config(TrainConfig, None, ["sync_batchnorm=off"]).sync_batchnorm == "off"
    assert TrainConfig().sync_batchnorm == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_sync_batchnorm("auto", cpu) and use_sync_batchnorm("auto", cuda)
    assert use_sync_batchnorm("on", cuda) and not use_sync_batchnorm("off", cuda)
    assert not use_sync_batchnorm("off", cpu)
    with pytest.raises(ValueError, match="sync_batchnorm=on needs CUDA"):
        use_sync_batchnorm("on", cpu)
    # It only acts with several processes, so a checkpoint resumes whatever it is; the number of
    # processes is not part of the configuration at all.
    assert resumable_config(_cfg(sync_batchnorm="on")) == resumable_config(_cfg(sync_batchnorm="off"))
    assert resumable_config(_cfg(lr=0.5)) != resumable_config(_cfg())


def test_single_process_is_untouched_by_the_distributed_module() -> None:
    assert isinstance(strategy_for("cpu"), Local)  # no process group: one process
    with distributed.session("cpu") as strategy:  # no WORLD_SIZE: nothing is initialised
        assert isinstance(strategy, Local) and not torch.distributed.is_initialized()
        assert (strategy.rank, strategy.world_size, strategy.shard_range(5)) == (0, 1, slice(0, 5))
        assert distributed.on_main(lambda: 7, strategy) == 7


# ------------------------------------------------------------------------------------ spawned ranks
def _audit_writes(root: str, log: list[str]) -> None:
    """Record every file-system write under ``root`` by this process (``sys.addaudithook``)."""
    import sys as _sys

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            path, mode, flags = str(args[0]), args[1], args[2]
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
            if writing and path.startswith(root):
                log.append(f"open {path}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir") and str(args[0]).startswith(root):
            log.append(f"{event} {args[0]}")

    _sys.addaudithook(hook)


def _worker(rank: int, world: int, root: str, rdzv: str) -> None:
    torch.set_num_threads(1)
    writes: list[str] = []
    _audit_writes(os.path.join(root, "runs"), writes)
    # A short timeout: a rank left waiting in a collective must fail the test, not hang it.
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{rdzv}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        out: dict[str, Any] = {}
        x, val = _noise(45), _noise(11, seed=1)
        runs = Path(root) / "runs"
        strategy = strategy_for("cpu")
        out["strategy"] = (type(strategy).__name__, strategy.rank, strategy.world_size)
        # 1. sync_batchnorm=on on the CPU stops every rank with the same one-line error, before any
        # collective (so none is left waiting).
        try:
            train_vae(x, None, _cfg(epochs=1, sync_batchnorm="on"), val_images=val, progress=False)
        except ValueError as exc:
            out["sync_on_cpu"] = str(exc)
        # 2. Resume a one-process checkpoint with two processes.
        res = train_vae(
            x,
            None,
            _cfg(epochs=4),
            val_images=val,
            checkpoint_dir=runs / "one_to_two",
            resume=True,
            progress=False,
        )
        out["one_to_two"] = {"history": res.history, "best_epoch": res.best_epoch}
        out["returned_model_types"] = sorted({type(m).__name__ for m in res.model.modules()})
        out["returned_state"] = res.model.state_dict()
        # 3. Two processes straight to 3 epochs, and 2 epochs then resumed to 3: the same at one world size.
        straight = train_vae(
            x, None, _cfg(epochs=3), val_images=val, checkpoint_dir=runs / "a", progress=False
        )
        train_vae(x, None, _cfg(epochs=2), val_images=val, checkpoint_dir=runs / "b", progress=False)
        resumed = train_vae(
            x, None, _cfg(epochs=3), val_images=val, checkpoint_dir=runs / "b", resume=True, progress=False
        )
        out["straight"], out["resumed"] = straight.history, resumed.history
        out["straight_state"], out["resumed_state"] = straight.model.state_dict(), resumed.model.state_dict()
        # 4. A failure on rank 0 (a full disk while writing) stops every rank instead of hanging them.
        try:
            strategy.on_main(lambda: 1 // 0)
        except ZeroDivisionError:
            out["on_main_error"] = "raised ZeroDivisionError"
        except RuntimeError as exc:
            out["on_main_error"] = str(exc)
        out["writes"] = writes
        with open(os.path.join(root, f"rank{rank}.pkl"), "wb") as fh:  # outside the audited runs/
            pickle.dump(out, fh)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """One spawn of two gloo ranks running every library-level scenario; their results per rank."""
    root = tmp_path_factory.mktemp("ddp")
    runs = root / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The one-process run that the two-process run resumes (2 of 4 epochs).
    train_vae(
        _noise(45),
        None,
        _cfg(epochs=2),
        val_images=_noise(11, seed=1),
        checkpoint_dir=runs / "one_to_two",
        progress=False,
    )
    shutil.copytree(runs / "one_to_two", root / "one_proc_ckpt")
    with pytest.MonkeyPatch.context() as mp:
        _child_env(mp)
        torch.multiprocessing.spawn(_worker, args=(2, str(root), str(root / "rdzv")), nprocs=2, join=True)
    torch.set_num_threads(threads)
    results = []
    for r in range(2):
        with open(root / f"rank{r}.pkl", "rb") as fh:
            results.append(pickle.load(fh))
    yield root, results


def test_ranks_get_the_torchrun_strategy_and_refuse_cpu_sync_batchnorm(
    two_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, results = two_ranks
    for rank, res in enumerate(results):
        assert res["strategy"] == (Torchrun.__name__, rank, 2)
        msg = res["sync_on_cpu"]
        assert msg.startswith("sync_batchnorm=on needs CUDA") and "\n" not in msg


def test_resume_one_process_checkpoint_with_two(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    root, results = two_ranks
    one = load_checkpoint(root / "one_proc_ckpt" / CHECKPOINT_NAME)
    a, b = results[0]["one_to_two"], results[1]["one_to_two"]
    # Identical global history and decisions on both ranks (only the wall times are each rank's own).
    assert a["best_epoch"] == b["best_epoch"] and _strip(a["history"]) == _strip(b["history"])
    assert [h["epoch"] for h in a["history"]] == [0, 1, 2, 3]
    assert _strip(a["history"][:2]) == _strip(one["history"])  # the first two epochs are the checkpoint's
    ckpt = load_checkpoint(root / "runs" / "one_to_two" / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 2
    assert _strip(ckpt["history"]) == _strip(a["history"])
    # Trained inside DDP, yet the checkpoint and the returned model are a plain ConvVAE's.
    plain = ConvVAE(_cfg().model)
    plain.load_state_dict(ckpt["model"], strict=True)
    plain.load_state_dict(ckpt["best_state"], strict=True)
    assert "DistributedDataParallel" not in results[0]["returned_model_types"]
    assert "BatchNorm2d" in results[0]["returned_model_types"]
    for k, v in results[0]["returned_state"].items():
        assert torch.equal(v, results[1]["returned_state"][k]), k  # every rank returns the same model


def test_resume_at_the_same_world_size_is_exact(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    for res in results:
        assert _strip(res["straight"]) == _strip(res["resumed"])
        for k, v in res["straight_state"].items():
            assert torch.equal(v, res["resumed_state"][k]), k


def test_a_failure_on_rank_zero_reaches_every_rank(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    assert results[0]["on_main_error"] == "raised ZeroDivisionError"  # its own exception, re-raised
    assert results[1]["on_main_error"].startswith("rank 0 failed: ZeroDivisionError")


def test_only_rank_zero_writes(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    assert results[1]["writes"] == []
    # The audit can fail: rank 0 wrote (atomically, through a temporary file) every checkpoint.
    written = " ".join(results[0]["writes"])
    for run in ("one_to_two", "a", "b"):
        assert f"runs/{run}/.{CHECKPOINT_NAME}." in written


# ------------------------------------------------------------------------------------ torchrun, end to end
def _scans(root: Path, n: int) -> Path:
    """Bright discs at varying positions on a noisy background: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    for i in range(n):
        disc = (xx - 10 - (i * 3) % 28) ** 2 + (yy - 10 - (i * 7) % 28) ** 2 < 64
        img = 50 + 120 * disc + rng.normal(0, 6, xx.shape)
        p = root / "normal" / f"IM-{i:04d}-0001.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
    return root


SETS = [
    "model.image_size=32",
    "model.channels=[8,16]",
    "model.latent_dim=8",
    "loss.kl_warmup_epochs=1",
    "batch_size=16",
    "lr=0.003",
    "val_fraction=0.2",
]


@pytest.mark.slow  # two torchrun launches and a resume: ~40 s on two cores
def test_torchrun_two_processes_match_one_and_resume_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medvae.cli import app
    from medvae.data.ingest import ingest
    from medvae.data.store import Store
    from medvae.engine.loop import build_engine, evaluate
    from medvae.jobs.train import load_training_data, train_job
    from medvae.vae.artifacts import load_model

    store = Store(tmp_path / "store")
    ingest([_scans(tmp_path / "src", 80)], store, IngestConfig(size=32, workers=1, intensity="none"))
    cfg = load_config(TrainConfig, None, [*SETS, "epochs=4", "device=cpu"])
    one = train_job(store.uri, tmp_path / "one", cfg, progress=False)

    _child_env(monkeypatch)
    two_dir = tmp_path / "two"
    args = ["train", "--nproc", "2", "--store", store.uri, "--out", str(two_dir), "--device", "cpu"]
    args += ["--epochs", "4", *[a for s in SETS for a in ("--set", s)]]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output

    # The model directory is a plain ConvVAE's (loads strictly), from a 2-process run.
    loaded = load_model(two_dir)
    assert isinstance(loaded.model, ConvVAE)
    metrics = json.loads((two_dir / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    ckpt = load_checkpoint(two_dir / "checkpoint" / CHECKPOINT_NAME)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 3
    assert sorted(p.name for p in (two_dir / "checkpoint").iterdir()) == [CHECKPOINT_NAME]

    # Same quality as one process, within the stated tolerance.
    best_one, best_two = one.val_loss, hist[metrics["best_epoch"]]["val_loss"]
    assert best_two == pytest.approx(best_one, rel=QUALITY_RTOL), (best_one, best_two)

    # The history is global: the last epoch's validation loss is that of the whole val set (not one
    # rank's half) under the checkpointed weights, recomputed here in one process.
    data = load_training_data(store, None, None, cfg)
    local = Local(torch.device("cpu"))
    engine = build_engine(cfg, local)
    engine.model.load_state_dict(ckpt["model"])
    val = torch.as_tensor(data.val_images).unsqueeze(1)
    full = evaluate(engine, val, None, local, batch_size=16, kl_w=cfg.loss.beta)
    assert full.images == len(data.val_images) and full.images == metrics_rows(two_dir)
    assert hist[-1]["val_loss"] == pytest.approx(full.loss, rel=1e-4)

    # Resume the 2-process checkpoint in one process, to 6 epochs.
    more = cfg.model_copy(update={"epochs": 6})
    res6 = train_job(store.uri, two_dir, more, resume=True, progress=False)
    hist6 = json.loads((two_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist6] == list(range(6))
    assert _strip(hist6[:4]) == _strip(hist)
    assert load_checkpoint(two_dir / "checkpoint" / CHECKPOINT_NAME).get("world_size", 1) == 1
    assert res6.val_loss <= best_two  # the selection state (best so far) carried over


def metrics_rows(model_dir: Path) -> int:
    """The validation row count that the model directory records."""
    return int(json.loads((model_dir / "meta.json").read_text())["dataset"]["val_rows"])


def test_cli_nproc_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medvae.cli import app

    runner = CliRunner()
    base = ["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "m")]
    res = runner.invoke(app, [*base, "--nproc", "3", "--set", "batch_size=8"])
    assert res.exit_code == 1 and "divisible by the 3 processes" in res.output
    assert "Traceback" not in res.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, [*base, "--nproc", "2"])
    assert res.exit_code == 1 and "already running under torchrun" in res.output


def test_torchrun_command_runs_the_train_entry_point() -> None:
    cmd = distributed.torchrun_command(4, ["--store", "s", "--out", "m"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=4" in cmd
    assert cmd[-6:] == ["-m", "medvae.train", "--store", "s", "--out", "m"]
