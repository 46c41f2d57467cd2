"""medvae._io: the bounded read every ingest and screen uses."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

from medvae._io import read_bounded


def test_read_bounded_reads_a_file_whole_without_allocating_the_limit(tmp_path: Path) -> None:
    data = b"x" * 20_000
    (tmp_path / "scan.jpeg").write_bytes(data)
    tracemalloc.start()
    try:
        with (tmp_path / "scan.jpeg").open("rb") as fh:
            got = read_bounded(fh, len(data), 2 * 2**30)
            _, peak = tracemalloc.get_traced_memory()
            fh.seek(0)
            fh.read(2 * 2**30 + 1)  # what it replaces
            _, peak_unbounded = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data
    assert peak < 1_000_000
    assert peak_unbounded > 2**30  # the test can tell: a plain read of the limit allocates all of it


def test_read_bounded_reads_on_when_the_file_grew_and_stops_past_the_limit() -> None:
    grown = b"y" * 500  # stat said 100 bytes
    assert read_bounded(io.BytesIO(grown), 100, 10_000) == grown
    # Over the limit: one byte more than the limit comes back, so the caller can tell.
    assert read_bounded(io.BytesIO(b"z" * 5_000), 100, 1_000) == b"z" * 1_001
    assert read_bounded(io.BytesIO(b"z" * 5_000), 3_000, 1_000) == b"z" * 1_001
    assert read_bounded(io.BytesIO(b""), 0, 1_000) == b""
