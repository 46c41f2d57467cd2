"""A local Prefect server that medvae starts, waits for and stops: the scheduler `medvae serve` needs.

Prefect's temporary (ephemeral) server runs no scheduler, so a deployment served on it never fires.
When no ``PREFECT_API_URL`` is set, `medvae serve` therefore runs ``prefect server start`` itself: SQLite
under a Prefect home that medvae owns (so schedules and run history survive a restart), on a free port
of 127.0.0.1, supervised for as long as the command runs, and stopped with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# The server took 17 s to start on an idle 2-core machine and 34-47 s beside two CPU-bound processes
# (docs/distributed.md); a first start also migrates a new database. Five minutes is generous, not hopeful.
STARTUP_TIMEOUT_S = 300.0


def medvae_prefect_home() -> Path:
    """Where medvae's own Prefect server keeps its database: MEDVAE_PREFECT_HOME, else ~/.medvae/prefect."""
    return Path(os.environ.get("MEDVAE_PREFECT_HOME") or Path.home() / ".medvae" / "prefect")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends SIGTERM when medvae dies, however it dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(proc: subprocess.Popen[bytes], api_url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the local Prefect server exited with code {proc.returncode} while starting; see {log}"
            )
        if _healthy(api_url):
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"the local Prefect server did not answer within {timeout:.0f} s (the machine may be very busy; "
        f"its log is {log}): retry, raise MEDVAE_SERVER_STARTUP_TIMEOUT, or run `prefect server start` "
        "yourself and set PREFECT_API_URL"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # The server starts its own children (uvicorn, services): signal its whole process group.
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


@contextlib.contextmanager
def local_server(home: Path | None = None, *, ui: bool = True, timeout: float | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on a free loopback port, wait until it is healthy, stop it at the end.

    Args:
        home: the Prefect home (database, logs); :func:`medvae_prefect_home` when None.
        ui: serve Prefect's web UI as well.
        timeout: seconds to wait for the server (``MEDVAE_SERVER_STARTUP_TIMEOUT`` or 300 when None).

    Yields:
        The server's API URL, e.g. ``http://127.0.0.1:40123/api``.
    """
    home = Path(home or medvae_prefect_home())
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [] if ui else ["--no-ui"]
    log = home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        _wait(
            proc,
            api_url,
            timeout or float(os.environ.get("MEDVAE_SERVER_STARTUP_TIMEOUT") or STARTUP_TIMEOUT_S),
            log,
        )
        yield api_url
    finally:
        _stop(proc)
