"""Shared fixtures: paths to the team's real data, and one Prefect test server per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample that the default run uses."""
    return REPO / "data" / "sample"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session: it takes ~10 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (no telemetry heartbeat from the test server either)

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the test models are tiny, so one thread is faster, and immune to
    OpenMP stalls on a busy shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
