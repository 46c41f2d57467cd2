"""benchmarks/gpu_train.py: it runs with torch alone, its parity check and its learning-rate rule."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medvae.config import ModelConfig, TrainConfig
from medvae.vae.model import ConvVAE

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_train.py"
# What the GPU script must do without: the pipeline's heavy dependencies, and rich (progress bars).
BLOCKED = ("monai", "pydicom", "prefect", "deltalake", "rich", "safetensors", "typer", "pandas", "pyarrow")
BLOCK = f"import sys\nfor m in {BLOCKED!r}:\n    sys.modules[m] = None  # import m now raises ImportError\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_engine_vae_and_config_import_without_the_pipeline_dependencies() -> None:
    code = (
        "try:\n    import monai\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('not blocked')\n"
        "import medvae.config, medvae.engine, medvae.vae, medvae.vae.model, medvae.vae.losses\n"
        "import medvae.engine.loop, medvae.engine.callbacks, medvae.engine.strategy\n"
        "import runpy\nrunpy.run_path('benchmarks/gpu_train.py', run_name='imported')\n"
        "print('ok')\n"
    )
    proc = _python(code, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_blocked_import_is_detected() -> None:
    # The check above can fail: a medvae module that needs deltalake does not import in the same harness.
    proc = _python("import medvae.engine\nimport medvae.data.store\n", timeout=300)
    assert proc.returncode != 0 and "import of deltalake halted" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_cpu_smoke_run_prints_one_json_line(tmp_path: Path) -> None:
    # A stand-in for the tutorial script: the comparison's plumbing, without its minutes on a CPU.
    fake = tmp_path / "reference.py"
    fake.write_text("import sys\nassert '--device' in sys.argv\nprint('reference img/s: 123.0')\n")
    argv = ["gpu_train.py", "--device", "cpu", "--seconds", "5", "--compare", "--reference", str(fake)]
    run = "runpy.run_path('benchmarks/gpu_train.py', run_name='__main__')"
    code = f"import runpy\nsys.argv = {argv!r}\n{run}\n"
    proc = _python(code, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    out = json.loads(lines[0])
    assert out["parity"]["passed"] and out["parity"]["loss_drop"] > 0
    assert out["production"]["img_per_s"] > 0 and out["production"]["batch"] == 64
    fast = out["fast"]["img_per_s"]
    assert fast > 0 and out["fast"]["resident"] and out["fast"]["fused_adam"]
    assert out["reference"]["img_per_s"] == 123.0
    assert out["ratio_fast_vs_reference"] == pytest.approx(fast / 123.0)


def _tiny() -> TrainConfig:
    # 64 px like the phantoms, few channels: a parity check that takes seconds.
    return TrainConfig(model=ModelConfig(channels=(4, 8), latent_dim=4), batch_size=16, device="cpu")


def test_shared_noise_draws_the_same_epsilon_and_is_undone() -> None:
    gt = _script()
    data = gt.phantoms(64)
    shared = gt.loss_curve(_tiny(), data, "cpu", 3, "off", noise=5)
    again = gt.loss_curve(_tiny(), data, "cpu", 3, "off", noise=5)
    other = gt.loss_curve(_tiny(), data, "cpu", 3, "off", noise=6)
    own = gt.loss_curve(_tiny(), data, "cpu", 3, "off", noise=None)
    assert shared == again
    assert shared != other and shared != own  # the patched noise is what the model drew
    assert isinstance(ConvVAE.__dict__["reparameterize"], staticmethod)
    mu = torch.zeros(2, 3)
    assert ConvVAE.reparameterize(mu, torch.full((2, 3), -100.0)).abs().max() < 1e-10


def test_parity_sees_bf16_arithmetic_and_tolerates_it() -> None:
    gt = _script()
    a = gt.parse(["--device", "cpu", "--check-steps", "6", "--check-window", "3"])
    res = gt.parity(a, _tiny(), emulate=True)
    assert res["amp"] == "bf16" and res["steps"] == 6
    # bf16 autocast moves the curve (so a deviation is measured, not assumed) but by far less than 3%.
    assert 0 < res["max_rel_dev"] < 0.03 and res["passed"]
    assert res["loss_drop"] > 0


def test_learning_rate_rule_scales_and_warms_up() -> None:
    gt = _script()
    assert gt.lr_at(10**6, 1e-3, 4096, "sqrt", 200) == pytest.approx(8e-3)
    assert gt.lr_at(10**6, 1e-3, 4096, "linear", 200) == pytest.approx(64e-3)
    assert gt.lr_at(10**6, 1e-3, 4096, "none", 200) == pytest.approx(1e-3)
    assert gt.lr_at(0, 1e-3, 4096, "sqrt", 200) == pytest.approx(8e-3 / 200)
    assert gt.lr_at(99, 1e-3, 4096, "sqrt", 200) == pytest.approx(4e-3)
    assert gt.lr_at(0, 1e-3, 64, "sqrt", 1) == pytest.approx(1e-3)
