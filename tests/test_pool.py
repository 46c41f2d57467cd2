"""medvae._pool: workers that die with their parent, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.crashkit import medvae_cmd, subprocess_env


def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (init here) has not reaped it yet


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pngs(dest: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (dest / "normal").mkdir(parents=True)
    for i in range(n):  # noise: slow to decode and compress, so the workers are busy for a while
        Image.fromarray(rng.integers(0, 256, (384, 384), dtype=np.uint8)).save(
            dest / "normal" / f"{i:04d}.png"
        )
    return dest


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_of_medvae_ingest_leaves_no_worker_behind(tmp_path: Path) -> None:
    """SIGKILL the `medvae ingest` process itself (not its process group, as a crash or the OOM killer
    would): every worker it had started must be gone within a few seconds."""
    src = _pngs(tmp_path / "src", 600)
    proc = subprocess.Popen(
        medvae_cmd("ingest", str(src), "--store", str(tmp_path / "store"), "--workers", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
    )
    everyone: set[int] = set()
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = {p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)}
            if len(workers) == 2:
                break
            time.sleep(0.05)
        assert len(workers) == 2 and proc.poll() is None, "the ingest never had its two workers running"
        time.sleep(1.0)  # let them get into their first batches
        everyone = _children(proc.pid)  # the workers and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in everyone):
            time.sleep(0.1)
        left = {p: _cmdline(p) for p in everyone if _alive(p)}
        assert not left, f"still alive 5 s after the parent's SIGKILL: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in everyone | _children(proc.pid):  # only what this test started, found by pid
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_watchdog_exits_a_worker_whose_parent_is_gone() -> None:
    """The getppid watchdog alone (without PR_SET_PDEATHSIG): told its parent is another pid, a process
    ends itself within about one polling interval."""
    code = (
        "import threading, time\n"
        "from medvae._pool import _watch_parent\n"
        "threading.Thread(target=_watch_parent, args=(-1,), daemon=True).start()\n"
        "time.sleep(30)\n"
        "raise SystemExit(0)\n"
    )
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), timeout=60, check=False)
    assert done.returncode == 1 and time.monotonic() - t0 < 20


def test_pool_workers_run_the_initializer_with_one_blas_thread() -> None:
    from medvae._pool import process_pool

    with process_pool(2, _remember_ppid, (os.getpid(),)) as pool:
        infos = list(pool.map(_worker_info, range(4)))
    assert {i["parent_ok"] for i in infos} == {True}
    assert {i["blas"] for i in infos} <= {1}  # every BLAS/OpenMP pool in the worker has one thread


_STATE: dict[str, int] = {}


def _remember_ppid(parent: int) -> None:
    _STATE["parent"] = parent


def _worker_info(_: int) -> dict[str, object]:
    from threadpoolctl import threadpool_info

    threads = {int(i["num_threads"]) for i in threadpool_info()} or {1}
    return {"parent_ok": _STATE.get("parent") == os.getppid(), "blas": max(threads)}


def test_a_process_that_arms_die_with_parent_ends_when_its_parent_is_killed() -> None:
    """What a `medvae serve` flow run does: it ends within seconds of a SIGKILL of its runner."""
    child = "from medvae._pool import die_with_parent; die_with_parent(); import time; time.sleep(120)"
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    time.sleep(3)  # let it import medvae and arm the guards
    assert Path(f"/proc/{grandchild}").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = (
        not Path(f"/proc/{grandchild}").exists()
        or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    )
    assert gone, "the process outlived its killed parent"
