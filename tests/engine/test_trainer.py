"""Training: overfitting, determinism, early stopping, atomic checkpoints, exact resume, CVAE, devices,
callbacks."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from medvae.config import GENERATOR_MIN_STEPS, GENERATOR_SSIM_WEIGHT, LossConfig, ModelConfig, TrainConfig
from medvae.engine import CHECKPOINT_NAME, Callback, Local, load_checkpoint, select_device, train_vae
from medvae.engine.callbacks import ModelSelection
from medvae.engine.data import augment_batch
from medvae.engine.loop import Run, TrainState, build_engine, run_epoch
from medvae.engine.trainer import step_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _patterns(n: int, size: int = 32) -> np.ndarray:
    """Bright squares at distinct positions on black: simple and exactly representable."""
    imgs = np.zeros((n, size, size), np.uint8)
    side = size // 4
    for i in range(n):
        r, c = (i * 5) % (size - side), (i * 3) % (size - side)
        imgs[i, r : r + side, c : c + side] = 255
    return imgs


def _noise(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "model": ModelConfig(image_size=16, channels=(8, 16), latent_dim=4),
        "loss": LossConfig(kl_warmup_epochs=2),
        "epochs": 4,
        "batch_size": 8,
        "device": "cpu",
        "seed": 3,
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_overfits_a_tiny_batch() -> None:
    x = _patterns(16)
    cfg = _cfg(
        model=ModelConfig(image_size=32, channels=(8, 16), latent_dim=8),
        loss=LossConfig(kl_warmup_epochs=0, beta=0.1),
        epochs=120,
        batch_size=16,
        lr=1e-2,
        patience=200,
    )
    res = train_vae(x, None, cfg, val_images=x, progress=False)
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.5 * first
    assert not res.model.training
    with torch.no_grad():
        xt = torch.as_tensor(x).unsqueeze(1).float() / 255
        mse = torch.mean((res.model(xt).recon - xt) ** 2).item()
    assert mse < 0.02
    h = res.history[0]
    assert set(h) == {
        "epoch",
        "loss",
        "recon",
        "kl",
        "kl_weight",
        "val_loss",
        "val_recon",
        "val_kl",
        "seconds",
        "img_per_s",
    }
    assert [r["epoch"] for r in res.history] == list(range(120))


def test_same_seed_same_weights() -> None:
    x = _noise(40)
    a = train_vae(x, None, _cfg(epochs=2), progress=False)
    b = train_vae(x, None, _cfg(epochs=2), progress=False)
    _states_equal(a.model.state_dict(), b.model.state_dict())
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = train_vae(x, None, _cfg(epochs=2, seed=4), progress=False)
    assert not torch.equal(a.model.fc_mu.weight, c.model.fc_mu.weight)


def test_history_and_kl_warmup() -> None:
    res = train_vae(
        _noise(40), None, _cfg(epochs=3, loss=LossConfig(kl_warmup_epochs=2, beta=0.5)), progress=False
    )
    assert [h["kl_weight"] for h in res.history] == [0.0, 0.25, 0.5]
    for h in res.history:
        # Validation always uses beta, whatever the warm-up weight of the epoch.
        assert h["val_loss"] == pytest.approx(h["val_recon"] + 0.5 * h["val_kl"], rel=1e-5)
        assert h["loss"] == pytest.approx(h["recon"] + h["kl_weight"] * h["kl"], rel=1e-4)


def test_early_stopping_restores_best() -> None:
    # Train on noise, validate on a fixed all-white image set: with a large lr validation cannot keep
    # improving, and patience 1 stops at the first epoch that fails to beat the best.
    x = _noise(32)
    val = np.full((8, 16, 16), 255, np.uint8)
    res = train_vae(x, None, _cfg(epochs=30, patience=1, lr=5e-2), val_images=val, progress=False)
    assert res.stopped_early
    n = len(res.history)
    assert n < 30
    vals = [h["val_loss"] for h in res.history]
    first = 1  # selection starts at the last warm-up epoch (kl_warmup_epochs=2 in _cfg)
    assert res.best_epoch == first + int(np.argmin(vals[first:]))
    assert res.best_epoch == n - 2  # the last epoch was the one (and only) epoch without improvement
    assert vals[-1] >= vals[-2]
    # The returned weights are the best epoch's, not the last epoch's.
    ck = train_vae(
        x, None, _cfg(epochs=res.best_epoch + 1, patience=1, lr=5e-2), val_images=val, progress=False
    )
    _states_equal(ck.model.state_dict(), res.model.state_dict())


def test_drops_only_a_last_batch_of_one() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    local = Local(torch.device("cpu"))
    engine = build_engine(cfg, local)
    kw: dict[str, Any] = {"epoch": 0, "seed": 0, "batch_size": 8, "kl_w": 0.0}
    imgs = torch.as_tensor(_noise(17)).unsqueeze(1)
    assert run_epoch(engine, imgs, None, local, **kw).images == 16
    imgs = torch.as_tensor(_noise(19)).unsqueeze(1)
    assert run_epoch(engine, imgs, None, local, **kw).images == 19


def test_checkpoint_atomic_and_weights_only(tmp_path: Path) -> None:
    res = train_vae(_noise(40), None, _cfg(epochs=2), checkpoint_dir=tmp_path / "ck", progress=False)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == [CHECKPOINT_NAME]  # no temporary file left behind
    raw = torch.load(tmp_path / "ck" / CHECKPOINT_NAME, weights_only=True)  # no pickled classes
    assert raw["epoch"] == 1 and raw["world_size"] == 1
    assert raw["history"] == res.history
    # No RNG state: every epoch reseeds from (seed, epoch, rank), which is what makes resume exact.
    assert not any(k.startswith("rng") for k in raw)
    ckpt = load_checkpoint(tmp_path / "ck" / CHECKPOINT_NAME)
    assert set(ckpt["model"]) == set(res.model.state_dict())
    _states_equal(ckpt["best_state"], res.model.state_dict())


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = tmp_path / "ck"
    train_vae(_noise(40), None, _cfg(epochs=1), checkpoint_dir=ck, progress=False)
    before = (ck / CHECKPOINT_NAME).read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        train_vae(_noise(40), None, _cfg(epochs=1, seed=9), checkpoint_dir=ck, progress=False)
    # The old checkpoint is intact and the temporary file is gone.
    assert (ck / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in ck.iterdir()) == [CHECKPOINT_NAME]


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    x = _noise(40)
    straight = train_vae(x, None, _cfg(epochs=4), checkpoint_dir=tmp_path / "a", progress=False)
    train_vae(x, None, _cfg(epochs=2), checkpoint_dir=tmp_path / "b", progress=False)
    resumed = train_vae(x, None, _cfg(epochs=4), checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.best_epoch == resumed.best_epoch
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in straight.history]
    assert strip == [
        {k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in resumed.history
    ]
    a = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    _states_equal(a["model"], b["model"])  # the last epoch's weights too, not just the best
    _states_equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    x = _noise(40)
    train_vae(x, None, _cfg(epochs=1), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train_vae(x, None, _cfg(epochs=2, lr=0.5), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="train / "):
        train_vae(_noise(60), None, _cfg(epochs=2), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_vae(x, None, _cfg(), resume=True, progress=False)


def test_cvae_needs_labels() -> None:
    cfg = _cfg(
        epochs=1,
        min_steps=0,
        model=ModelConfig(image_size=16, channels=(8, 16), latent_dim=4, conditional=True, num_classes=3),
    )
    x = _noise(30)
    y = np.arange(30) % 3
    res = train_vae(x, y, cfg, progress=False)
    assert res.model.n_cond == 3 and np.isfinite(res.history[0]["val_loss"])
    with pytest.raises(ValueError, match="needs labels"):
        train_vae(x, None, cfg, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        train_vae(x, np.arange(30) % 4, cfg, progress=False)
    with pytest.raises(ValueError, match="val_labels"):
        train_vae(x, y, cfg, val_images=x[:4], progress=False)


def test_rejects_bad_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        train_vae(_noise(10).astype(np.float32), None, _cfg(), progress=False)
    with pytest.raises(ValueError, match="shaped"):
        train_vae(_noise(10, size=32), None, _cfg(), progress=False)


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(torch.nn.Module):
        """Stands in for a compiled model whose compilation fails at the first call, as inductor does."""

        def forward(self, *args: object) -> None:
            raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    x = _noise(40)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        res = train_vae(x, None, _cfg(epochs=2, compile=True), progress=False)
    eager = train_vae(x, None, _cfg(epochs=2), progress=False)
    _states_equal(res.model.state_dict(), eager.model.state_dict())


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA was requested but no GPU is visible"):
            select_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(tmp_path: Path) -> None:
    x = _patterns(64)
    cfg = _cfg(model=ModelConfig(image_size=32, channels=(8, 16), latent_dim=8), epochs=3, device="cuda")
    res = train_vae(x, None, cfg, checkpoint_dir=tmp_path, progress=False)
    assert res.device == "cuda"
    assert next(res.model.parameters()).is_cuda
    assert all(np.isfinite(h["loss"]) for h in res.history)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 2
    resumed = train_vae(
        x, None, cfg.model_copy(update={"epochs": 4}), checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert len(resumed.history) == 4


def test_augment_batch_shifts_whole_pixels_and_scales_contrast() -> None:
    x = torch.as_tensor(_patterns(8)).unsqueeze(1).float() / 255
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, max_shift=4, max_gain=0.1)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    for a, b in zip(x, out, strict=True):
        # A square of 255s moves by whole pixels (no blur) and keeps its area unless it hits the border.
        values = torch.unique(b[b > 0])
        assert values.numel() == 1 and 0.89 <= float(values[0]) <= 1.0
        assert int((b > 0).sum()) <= int((a > 0).sum())
    again = augment_batch(x, torch.Generator().manual_seed(0), max_shift=4, max_gain=0.1)
    assert torch.equal(out, again)  # reproducible from the generator alone
    still = augment_batch(x, torch.Generator().manual_seed(0), max_shift=0, max_gain=0.0)
    assert torch.equal(still, x)  # no shift and no gain is the identity


def test_training_with_augmentation_is_seeded_and_differs_from_without() -> None:
    x = _patterns(24)
    cfg = _cfg(model=ModelConfig(image_size=32, channels=(8, 16), latent_dim=4), epochs=2)
    plain = train_vae(x, None, cfg, progress=False).model.state_dict()
    aug_a = train_vae(x, None, cfg.model_copy(update={"augment": True}), progress=False).model.state_dict()
    aug_b = train_vae(x, None, cfg.model_copy(update={"augment": True}), progress=False).model.state_dict()
    _states_equal(aug_a, aug_b)
    assert any(not torch.equal(plain[k], aug_a[k]) for k in plain)


def test_warm_up_epochs_are_never_selected_or_counted_against_patience() -> None:
    # With patience 1, an early stop during the warm-up would end training at epoch 1 or 2; selection
    # may only start at the end of the warm-up, so the best epoch is at least kl_warmup_epochs - 1.
    x = _noise(32)
    cfg = _cfg(loss=LossConfig(kl_warmup_epochs=4), epochs=6, patience=1)
    res = train_vae(x, None, cfg, val_images=_noise(16, seed=1), progress=False)
    assert len(res.history) >= 5
    assert res.best_epoch >= 3
    assert [h["kl_weight"] for h in res.history[:4]] == [0.0, 0.25, 0.5, 0.75]


def test_one_process_strategy_is_the_identity(tmp_path: Path) -> None:
    # Local wraps nothing: the step calls the plain model (plain BatchNorm), and the checkpoint says 1.
    engine = build_engine(_cfg(), Local(torch.device("cpu")))
    assert engine.eager is engine.model and engine.module is engine.model
    assert {type(m).__name__ for m in engine.model.modules()} >= {"BatchNorm2d"}
    assert not any("Sync" in type(m).__name__ for m in engine.model.modules())
    train_vae(_noise(40), None, _cfg(epochs=1), checkpoint_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["world_size"] == 1


def test_resume_accepts_another_sync_batchnorm_setting(tmp_path: Path) -> None:
    # sync_batchnorm only acts with several processes, so like the world size it may change on resume.
    x = _noise(40)
    train_vae(x, None, _cfg(epochs=1, sync_batchnorm="off"), checkpoint_dir=tmp_path, progress=False)
    res = train_vae(
        x, None, _cfg(epochs=2, sync_batchnorm="auto"), checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert [h["epoch"] for h in res.history] == [0, 1]


def test_sync_batchnorm_on_without_cuda_is_a_one_line_error() -> None:
    # torch's SyncBatchNorm has CUDA kernels only; medvae's CPU emulation was removed (measured no better).
    expected = r"sync_batchnorm=on needs CUDA.*set sync_batchnorm=auto or off"
    with pytest.raises(ValueError, match=expected) as e:
        train_vae(_noise(40), None, _cfg(epochs=1, sync_batchnorm="on"), progress=False)
    assert "\n" not in str(e.value)


def test_load_checkpoint_refuses_foreign_files_in_one_line(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.getcwd, ())

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"x": Payload()}, tmp_path / "code.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    for name, why in [
        ("garbage.pt", "not a torch file"),
        ("empty.pt", "not a torch file"),
        ("code.pt", "not a torch file of tensors and plain data"),
        ("other.pt", "no medvae format marker"),
    ]:
        with pytest.raises(ValueError, match=why) as e:
            load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name} is not a medvae training checkpoint") and "\n" not in msg
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


class _Recorder(Callback):
    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[str] = []
        self.fail_at = fail_at

    def on_fit_start(self, run: Run) -> None:
        self.events.append(f"start@{run.state.epoch}")

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        # The built-in callbacks ran first: the selection state and the history include this epoch.
        assert run.state.history[-1] is record and run.state.epoch == record["epoch"]
        assert run.state.best_epoch <= record["epoch"]
        self.events.append(f"epoch{record['epoch']}")
        if record["epoch"] == self.fail_at:
            raise KeyboardInterrupt

    def on_fit_end(self, run: Run) -> None:
        self.events.append("end")


def test_callbacks_see_every_epoch_and_fit_end_runs_after_an_error(tmp_path: Path) -> None:
    rec = _Recorder()
    train_vae(_noise(40), None, _cfg(epochs=3), checkpoint_dir=tmp_path, callbacks=[rec], progress=False)
    assert rec.events == ["start@-1", "epoch0", "epoch1", "epoch2", "end"]
    more = _Recorder(fail_at=3)
    cfg, ck = _cfg(epochs=5), tmp_path
    with pytest.raises(KeyboardInterrupt):
        train_vae(_noise(40), None, cfg, checkpoint_dir=ck, resume=True, callbacks=[more], progress=False)
    assert more.events == ["start@2", "epoch3", "end"]
    # The checkpointer (a built-in, before the failing callback) had already saved epoch 3.
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_run_bf16_autocast_on_device_resident_data() -> None:
    cfg = _cfg(model=ModelConfig(image_size=32, channels=(8, 16), latent_dim=8), device="cuda")
    local = Local(select_device("cuda"))
    engine = build_engine(cfg, local)
    assert engine.amp_dtype == torch.bfloat16
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        seen.append((torch.is_autocast_enabled("cuda"), out.dtype))

    engine.model.encoder[0].register_forward_hook(hook)
    images = torch.as_tensor(_patterns(128)).unsqueeze(1).cuda()  # 16 steps of 8
    kw: dict[str, Any] = {"seed": 0, "batch_size": 8, "kl_w": 1.0}
    run_epoch(engine, images, None, local, epoch=0, **kw)  # warm-up: cuDNN's algorithm search
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        torch.ones(4).cuda()  # one known host-to-device copy: proves the profiler sees them
        totals = run_epoch(engine, images, None, local, epoch=1, **kw)
        torch.cuda.synchronize()
    assert totals.images == 128
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen), seen[:3]
    h2d = [e.name for e in prof.events() if "HtoD" in e.name]
    # The known copy, the epoch's shard indices and the image count at the end: never one per step.
    assert 1 <= len(h2d) <= 4 < 16, h2d


def test_a_step_floor_raises_the_epochs_of_a_small_dataset() -> None:
    # 30 images at batch 8: 4 steps an epoch (the last batch of 6 is kept), so 10 steps need 3 epochs.
    cfg, min_epochs = step_budget(_cfg(epochs=2, min_steps=10), 30)
    assert (cfg.epochs, min_epochs) == (3, 3)
    same, none = step_budget(_cfg(epochs=2, min_steps=0), 30)
    assert (same.epochs, none) == (2, 0)
    # None resolves by the kind of model: a generator gets the floor, the anomaly VAE none.
    cond = ModelConfig(image_size=16, channels=(8, 16), latent_dim=4, conditional=True, num_classes=2)
    assert _cfg(model=cond).step_floor == GENERATOR_MIN_STEPS and _cfg().step_floor == 0
    # Two processes at the same global batch take the same 4 global steps.
    assert step_budget(_cfg(epochs=1, min_steps=10), 30, world_size=2)[1] == 3


def test_the_structural_loss_weight_resolves_by_the_kind_of_model() -> None:
    cond = ModelConfig(image_size=16, channels=(8, 16), latent_dim=4, conditional=True, num_classes=2)
    assert _cfg(model=cond).resolved_loss.ssim_weight == GENERATOR_SSIM_WEIGHT > 0
    assert _cfg().resolved_loss.ssim_weight == 0.0
    explicit = _cfg(model=cond, loss=LossConfig(kl_warmup_epochs=2, ssim_weight=0.0))
    assert explicit.resolved_loss.ssim_weight == 0.0
    # The engine trains on the resolved loss, and nothing else of the loss config changes.
    engine = build_engine(_cfg(model=cond), Local(torch.device("cpu")))
    assert engine.loss_cfg == _cfg(model=cond).loss.model_copy(update={"ssim_weight": GENERATOR_SSIM_WEIGHT})


def test_early_stopping_waits_for_the_step_floor() -> None:
    # The validation loss only worsens after epoch 0: patience 1 stops at epoch 1 without a floor, and
    # not before epoch 5 (the sixth) with min_epochs 6.
    def stop_epoch(min_epochs: int) -> int | None:
        net = torch.nn.Linear(2, 2)
        state = TrainState(best_state=net.state_dict())
        run = SimpleNamespace(state=state, engine=SimpleNamespace(model=net))
        sel = ModelSelection(patience=1, warmup_epochs=0, epochs=10, min_epochs=min_epochs)
        for epoch in range(10):
            sel.on_epoch_end(run, {"epoch": epoch, "val_loss": float(epoch)})  # type: ignore[arg-type]
            if run.state.stopped_early:
                return epoch
        return None

    assert stop_epoch(0) == 1 and stop_epoch(6) == 5
