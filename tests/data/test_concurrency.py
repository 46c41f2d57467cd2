"""Two ingests into one store at the same moment: no row lost, none duplicated, failures explained.

Each writer is a spawned process that imports medvae first and then waits on a shared barrier, so both
decode and commit at about the same time; the race covers a store that exists and one that does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from tests.crashkit import (
    _run_together,
    audit_store,
    concurrent_ingests,
    concurrent_inserts,
    expected_ids,
    fake_rows,
    make_pngs,
    store_ids,
)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_pngs(tmp_path_factory.mktemp("conc"), n=40, seed=3)


@pytest.mark.parametrize("exists", [False, True], ids=["new-store", "existing-store"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "disjoint"])
def test_two_concurrent_ingests(pngs: list[Path], tmp_path: Path, exists: bool, overlap: bool) -> None:
    from medvae.config import IngestConfig
    from medvae.data.ingest import ingest
    from medvae.data.store import Store

    store = tmp_path / "store"
    pre = pngs[39:]
    if exists:
        ingest(pre, Store(store), IngestConfig(workers=1))
    a, b = (pngs[0:25], pngs[15:39]) if overlap else (pngs[0:19], pngs[19:39])
    results = concurrent_ingests(store, [a, b])
    for res in results:
        # A writer may fail only with a clear, actionable conflict error (never a raw delta-rs message).
        if res[0] == "error":
            assert res[1] == "StoreError" and "Re-run the command" in res[2], res
    assert any(r[0] == "ok" for r in results), results
    ok_files = set(pre if exists else [])
    for res, files in zip(results, (a, b), strict=True):
        if res[0] == "ok":
            ok_files |= set(files)
    assert audit_store(store) == []
    ids = store_ids(store)
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert set(ids) == expected_ids(store, sorted(ok_files)), "rows lost or unexpected"
    # Lineage tells the truth: the rows each version records as added sum to the rows in the store.
    added = [int(h.lineage.get("rows_added", 0)) for h in Store(store).history()]
    assert sum(added) == len(ids), added


def _rows(ids: list[str]) -> pa.Table:
    return fake_rows(ids)


@pytest.mark.slow  # many racing processes: ~20 s; the two-ingest races above stay in the default suite
def test_racing_creators_of_a_new_store_do_not_duplicate(tmp_path: Path) -> None:
    """Two writers create the same new store at the same instant, three times over. delta-rs used to
    retry the loser's create as a blind append (version 1 repeating every shared id)."""
    for round_ in range(3):
        store = tmp_path / f"store{round_}"
        results = concurrent_inserts(store, [list("abcdef"), list("defghi")])
        assert all(r[0] == "ok" for r in results), results
        ids = store_ids(store)
        assert sorted(ids) == list("abcdefghi"), f"round {round_}: {sorted(ids)}"
        assert audit_store(store) == []


def test_merge_on_a_stale_snapshot_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit race made deterministic: the first merge runs on a snapshot that another writer has
    since advanced, so delta-rs refuses its commit; medvae must re-run the merge, not fail or duplicate."""
    from medvae.data.store import Store, lineage

    store = Store(tmp_path / "store")
    store.insert_new(_rows(["a", "b", "c"]), lineage("ingest", {}, rows_added=3))
    stale = store.table()
    store.insert_new(_rows(["c", "d", "e"]), lineage("ingest", {}, rows_added=3))  # the other writer: v1
    real_table = Store.table
    calls = {"n": 0}

    def first_stale(self: Store, version: int | None = None) -> DeltaTable:
        calls["n"] += 1
        return stale if calls["n"] == 1 else real_table(self, version)

    monkeypatch.setattr(Store, "table", first_stale)
    version = store.insert_new(_rows(["d", "e", "f", "g"]), lineage("ingest", {}, rows_added=4))
    monkeypatch.undo()
    assert calls["n"] >= 2, "the merge was not retried"
    assert version == 2
    assert sorted(store_ids(tmp_path / "store")) == ["a", "b", "c", "d", "e", "f", "g"]
    assert audit_store(tmp_path / "store") == []  # v1 and v2 record the rows they really added (2 and 2)


def test_endless_contention_ends_in_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that changes under every attempt: a bounded number of retries, then an actionable
    StoreError (not delta-rs's advice to lower the isolation level), and nothing half-written."""
    from medvae.data.store import Store, StoreError, lineage

    store = Store(tmp_path / "store")
    store.insert_new(_rows(["a"]), lineage("ingest", {}, rows_added=1))
    stale = store.table()
    store.insert_new(_rows(["b"]), lineage("ingest", {}, rows_added=1))
    monkeypatch.setattr(Store, "table", lambda self, version=None: stale)
    with pytest.raises(StoreError, match="Re-run the command"):
        store.insert_new(_rows(["c"]), lineage("ingest", {}, rows_added=1))
    monkeypatch.undo()
    assert sorted(store_ids(tmp_path / "store")) == ["a", "b"] and audit_store(tmp_path / "store") == []


# ------------------------------------------------------------------------------- what each call committed
def _ingest_reporting(sources: list[str], store: str, barrier: Any, result: Any) -> None:
    """A writer for :func:`_run_together` that returns its whole report (per file), not just the counts."""
    from medvae.config import IngestConfig
    from medvae.data.ingest import ingest
    from medvae.data.store import Store

    cfg = IngestConfig(workers=1)
    barrier.wait(timeout=120)
    try:
        rep = ingest([Path(p) for p in sources], Store(store), cfg)
        result.put(("ok", rep.to_json()))
    except Exception as exc:
        result.put(("error", type(exc).__name__, str(exc)))


def _assert_reports_tell_the_truth(store: Path, reports: list[dict[str, Any]], pre_rows: int) -> None:
    """Each report's version, rows_added and per-file statuses are what that call really committed."""
    from medvae.data.ingest import ALREADY_STORED, COMMITTED_CONCURRENTLY
    from medvae.data.store import Store

    hist = {h.version: h for h in Store(store).history()}
    claimed: list[str] = []
    for rep in reports:
        mine = [i for f in rep["files"] if f["status"] == "ingested" for i in f["ids"]]
        assert rep["rows_added"] == len(mine)
        claimed += mine
        if rep["version"] is None:
            assert mine == [], rep
            continue
        h = hist[rep["version"]]
        before = Store(store).read(h.version - 1, ["id"]).column("id").to_pylist() if h.version else []
        added = set(Store(store).read(h.version, ["id"]).column("id").to_pylist()) - set(before)
        assert added == set(mine), f"v{h.version} added {len(added)}, the report claims {len(mine)}"
        assert h.lineage["rows_added"] == len(mine) and h.lineage["counts"] == rep["counts"]
        for f in rep["files"]:
            if f["status"] == "skipped":
                assert f["reason"] in (ALREADY_STORED, COMMITTED_CONCURRENTLY) or "this batch" in f["reason"]
    assert len(claimed) == len(set(claimed)), "two calls both claim the same rows"
    assert len(claimed) + pre_rows == len(store_ids(store))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "disjoint"])
def test_concurrent_reports_say_what_each_call_committed(
    pngs: list[Path], tmp_path: Path, overlap: bool
) -> None:
    store = tmp_path / "store"
    a, b = (pngs[0:25], pngs[15:39]) if overlap else (pngs[0:19], pngs[19:39])
    results = _run_together(_ingest_reporting, [([str(p) for p in fs], str(store)) for fs in (a, b)], 240)
    reports = [r[1] for r in results if r[0] == "ok"]
    assert reports, results
    _assert_reports_tell_the_truth(store, reports, 0)


def _decoded(files: list[Path], store: Any, cfg: Any) -> list[Any]:
    """Plan and decode ``files`` for ``store`` without committing: a writer caught before its commit."""
    from medvae.data.ingest import DecodeContext, decode_many, plan_ingest

    plan = plan_ingest(files, store, cfg)
    decoded = decode_many([j for _, j in plan.jobs], DecodeContext(plan.key, plan.known, cfg))
    for (slot, _), res in zip(plan.jobs, decoded, strict=True):
        plan.results[slot] = res
    return [r for r in plan.results if r is not None]


def test_a_writer_overtaken_on_some_files_reports_only_its_own_rows(pngs: list[Path], tmp_path: Path) -> None:
    """The race made deterministic: writer A has decoded files 0..24 when writer B commits 15..38; A's
    commit adds 15 rows, and its report and lineage say so (not 25), with 15..24 skipped as committed by a
    concurrent ingest."""
    from medvae.config import IngestConfig
    from medvae.data.ingest import COMMITTED_CONCURRENTLY, commit_ingest, ingest
    from medvae.data.store import Store

    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "store")
    ingest(pngs[39:], store, cfg)  # v0
    pending = _decoded(pngs[0:25], store, cfg)
    other = ingest(pngs[15:39], store, cfg)  # v1, committed while A was decoding
    assert other.version == 1 and other.rows_added == 24
    mine = commit_ingest(pending, store, cfg)
    assert mine.version == 2 and mine.rows_added == 15
    by_name = {Path(f.path).name: f for f in mine.files}
    assert all(by_name[p.name].status == "ingested" for p in pngs[0:15])
    assert all(by_name[p.name].reason == COMMITTED_CONCURRENTLY for p in pngs[15:25])
    assert mine.counts == {"seen": 25, "ingested": 15, "rejected": 0, "skipped": 10}
    lin = store.history()[2].lineage
    assert lin["rows_added"] == 15 and lin["counts"] == mine.counts
    _assert_reports_tell_the_truth(tmp_path / "store", [other.to_json(), mine.to_json()], 1)


def test_a_writer_overtaken_on_every_file_commits_nothing_and_says_so(
    pngs: list[Path], tmp_path: Path
) -> None:
    from medvae.config import IngestConfig
    from medvae.data.ingest import COMMITTED_CONCURRENTLY, commit_ingest, ingest
    from medvae.data.store import Store

    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "store")
    ingest(pngs[39:], store, cfg)
    pending = _decoded(pngs[0:10], store, cfg)
    ingest(pngs[0:10], store, cfg)
    mine = commit_ingest(pending, store, cfg)
    assert mine.version is None and mine.rows_added == 0
    assert {f.reason for f in mine.files} == {COMMITTED_CONCURRENTLY}
    assert mine.to_json()["files"][0]["ids"] == [] and store.version() == 1
