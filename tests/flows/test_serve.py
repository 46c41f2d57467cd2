"""`medvae serve` alone, on a fresh machine, runs the pipeline at each cron time (issue 10).

Prefect's temporary server has no scheduler, so serve must start and supervise a real one. This test
serves a tiny pipeline with a cron of every minute and waits for a completed scheduled run to write a
new store version; then Ctrl-C must stop the deployment and the server, leaving no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvae.data.store import Store

DEADLINE_S = 600  # the issue asks for a version within 6 minutes on a busy 2-core machine; CI gets slack


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt: set[int] = set()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in frontier and int(p.name) not in out:
                nxt.add(int(p.name))
        out |= nxt
        frontier = nxt
    return out


@pytest.mark.slow
# Ctrl-C at a terminal; SIGTERM from systemd, docker stop or a scheduler (Prefect's runner turns it into
# sys.exit, and its API-retrying threads once kept the process alive after the server was stopped).
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_runs_the_pipeline_on_its_cron_and_stops_cleanly(
    sample_dir: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    src = tmp_path / "src" / "normal"
    src.mkdir(parents=True)
    for f in sorted((sample_dir / "normal").iterdir())[:24]:
        shutil.copy(f, src / f.name)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"sources: [{src.parent}]\nstore: {tmp_path / 'store'}\nmodel_dir: {tmp_path / 'model'}\n"
        'schedule: "* * * * *"\ntrain_where: {label: normal}\ningest: {workers: 1}\naugment: {count: 4}\n'
        "train: {model: {channels: [8, 16], latent_dim: 4}, epochs: 1, batch_size: 8, device: cpu}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["MEDVAE_PREFECT_HOME"] = str(tmp_path / "prefect")  # a fresh machine: no database yet
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--config", str(cfg), "--no-ui"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    start = time.monotonic()
    store = Store(tmp_path / "store")
    try:
        while time.monotonic() - start < DEADLINE_S:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            if store.exists() and any(h.operation == "pipeline" for h in store.history()):
                break
            time.sleep(5)
        else:
            pytest.fail(
                f"no pipeline version within {DEADLINE_S} s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            )
        elapsed = time.monotonic() - start
        family = _children(proc.pid)
        assert family, "serve runs its own Prefect server as a child"
    finally:
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    text = (tmp_path / "serve.log").read_text()
    assert "pipeline: wrote version" in text
    print(f"first scheduled pipeline version after {elapsed:.0f} s")
    time.sleep(5)
    assert not ({p for p in family if Path(f"/proc/{p}").exists()}), "serve left processes behind"
