"""SIGKILL every medvae command at a random moment: the store and the checkpoint must survive intact.

Each trial kills a real ``python -m medvae`` subprocess (whole process group) at a seeded random delay in
[0, the command's measured uninterrupted time], audits the store's every version and the training
checkpoint, re-runs the command, and checks that the end state equals an uninterrupted run's. A kill that
comes after the command finished counts as "not mid-run", never as a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crashkit import Campaign, Trial, run_trials

SEED = 20261123


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    """40 generated PNGs, a half-ingested base store, and one measured uninterrupted run per command."""
    yield Campaign(tmp_path_factory.mktemp("crash"), epochs=12).prepare(n_images=40)


def _check(trials: list[Trial]) -> None:
    for t in trials:
        where = f"{t.command} killed at {t.delay:.2f}s (mid-run: {t.mid_run})"
        assert not t.corrupted, f"{where}: {t.corrupted}"
        assert t.rerun_error is None, f"{where}: {t.rerun_error}"
        if t.epochs_lost is not None:
            assert t.epochs_lost <= 1, f"{where}: {t.epochs_lost} epochs lost on resume"


# The campaign trains and augments once before any kill (~45 s), and each kill re-runs its command: -m slow.
# The default suite keeps the parent-death check of ingest's pool (tests/test_pool.py) and the audit below.
@pytest.mark.slow
@pytest.mark.parametrize("command", ["ingest", "train", "augment"])
def test_killed_command_leaves_store_consistent_and_rerun_completes(
    campaign: Campaign, command: str, tmp_path: Path
) -> None:
    trials = run_trials(campaign, command, trials=2 if command == "ingest" else 1, seed=SEED, work=tmp_path)
    _check(trials)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ingest", "train", "augment", "run"])
def test_many_kills(campaign: Campaign, command: str, tmp_path: Path) -> None:
    if command == "run" and "run" not in campaign.bounds:
        campaign.prepare_run()  # `medvae run` (Prefect pipeline): ~30 s a run, so fewer trials
    _check(run_trials(campaign, command, trials=3 if command == "run" else 8, seed=SEED + 1, work=tmp_path))


def test_audit_detects_duplicates(tmp_path: Path) -> None:
    """The audit itself can fail: a version with a repeated id (written behind medvae's back) is found."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from medvae.data.store import SCHEMA, Store, empty_rows, lineage, to_arrow
    from tests.crashkit import audit_store

    buf = empty_rows()
    for rid in ("a", "b"):
        for k in buf:
            buf[k].append(None)
        buf["id"][-1], buf["height"][-1], buf["width"][-1] = rid, 2, 2
        buf["pixels"][-1], buf["origin"][-1] = b"\0" * 4, "real"
    rows = to_arrow(buf)
    s = Store(tmp_path / "s")
    s.insert_new(rows, lineage("ingest", {}, rows_added=2))
    assert audit_store(tmp_path / "s") == []
    write_deltalake(str(tmp_path / "s"), rows.slice(0, 1).cast(SCHEMA), mode="append")
    found = audit_store(tmp_path / "s")
    assert any("duplicate" in p for p in found), found
    assert pa.types.is_string(SCHEMA.field("id").type)
