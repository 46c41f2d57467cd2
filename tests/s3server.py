"""A loopback S3 server for the tests: moto's ``ThreadedMotoServer``, run in a child process.

Why a child process: deltalake runs some of its Rust code without releasing the GIL
(``DeltaTable.history()`` among them, see delta-io/delta-rs#4362), so a moto server on a thread of the
test process cannot answer the request that the Rust code waits for, and every such call hangs until
the HTTP timeout. A server in its own interpreter has its own GIL.

Why the lock: moto checks ``If-None-Match: *`` and then stores the object in two steps, so two
concurrent conditional PUTs of the same key can both succeed there; on AWS S3 the check and the write
are one atomic step ("the first write to finish succeeds, the others get 412"). Serialising PutObject
in the server makes the emulator keep the contract that the concurrency tests rely on.

The server also appends one line per PutObject under ``_delta_log/`` or ``_medvae/`` to an audit file
(``bucket/key<TAB>If-None-Match header``), so that a test can check that every commit was a conditional
create.

Run as a script, it prints its port on stdout and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only: nothing outside this machine can reach the test server


@dataclass
class S3Server:
    """A running server: its endpoint URL and the audit file of its PutObject requests."""

    endpoint: str
    audit: Path
    proc: subprocess.Popen[str]

    def conditional_puts(self, prefix: str = "") -> list[tuple[str, str]]:
        """``(bucket/key, If-None-Match header or "")`` of every audited PutObject under ``prefix``."""
        if not self.audit.exists():
            return []
        rows = [line.split("\t") for line in self.audit.read_text().splitlines() if line]
        return [(k, v) for k, v in rows if k.startswith(prefix)]

    def stop(self, timeout: float = 10) -> None:
        """Close the server's stdin (its signal to stop) and wait; kill it if it does not exit."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def s3_server(audit: Path, start_timeout: float = 60) -> Iterator[S3Server]:
    """Start moto on a free loopback port in a child process; stop it on exit.

    Args:
        audit: the file that the server appends its PutObject audit lines to.
        start_timeout: seconds to wait for the server to report its port.
    """
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--audit", str(audit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = S3Server("", audit, proc)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"the moto S3 server did not start (exit code {proc.poll()}, said {line!r})")
        server.endpoint = f"http://{HOST}:{int(line)}"
        yield server
    finally:
        server.stop()


def _serve(audit: Path) -> None:
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    lock = threading.Lock()
    original = S3Response.put_object

    def put_object(self: Any) -> Any:
        with lock:  # the If-None-Match check and the write as one step, as on AWS S3
            key = str(self.parse_key_name())
            if "_delta_log/" in key or "_medvae/" in key:
                with audit.open("a", encoding="utf-8") as fh:
                    fh.write(f"{self.bucket_name}/{key}\t{self.headers.get('If-None-Match') or ''}\n")
            return original(self)

    S3Response.put_object = put_object  # type: ignore[method-assign]
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--audit", type=Path, required=True)
    _serve(parser.parse_args().audit)
