"""The batched ingest (plan -> decode batches -> commit once) that task runners drive, without Prefect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medvae.config import IngestConfig
from medvae.data.ingest import KnownIds, commit_batches, decode_batch, ingest, prepare_batches
from medvae.data.staging import staging_uri
from medvae.data.store import Store, StoreError
from tests.data.test_ingest import _png

COLUMNS = ["id", "source_id", "patient_key", "pixels", "label", "split", "frame", "modality", "orig_rows"]


def _rows(store: Store) -> list[tuple[object, ...]]:
    t = store.read(columns=COLUMNS).to_pydict()
    return sorted(zip(*(t[c] for c in COLUMNS), strict=True))


def _same_key(src: Path, dst: Path) -> None:
    # The same key makes ids comparable across two stores.
    (dst / "_medvae").mkdir(parents=True)
    shutil.copy(src / "_medvae" / "store.key", dst / "_medvae" / "store.key")


def _batched(sources: list[Path], store: Store, cfg: IngestConfig, batch_files: int, order: list[int] | None):
    staging = staging_uri(store.uri, "run1")
    plan = prepare_batches(sources, store, cfg, staging, batch_files)
    # Batches finish in any order on a cluster; the outcome must not depend on it.
    for i in order if order is not None else range(plan["batches"]):
        decode_batch(staging, i, store, cfg)
    return plan, commit_batches(staging, store, cfg)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(9):
        _png(root / ("normal" if i % 3 else "pneumonia") / f"{i:02d}.png", i)
    # The same content in two batches: the first in walk order must win, as in the embedded ingest.
    (root / "zz").mkdir()
    (root / "zz" / "dup_of_00.png").write_bytes((root / "pneumonia" / "00.png").read_bytes())
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "notes.txt").write_text("not an image")
    return root


def test_batched_ingest_gives_exactly_the_embedded_store(tree: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=1)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    rep_a = ingest([tree], a, cfg)
    _same_key(tmp_path / "a", tmp_path / "b")
    plan, rep_b = _batched([tree], b, cfg, batch_files=3, order=[3, 1, 0, 2])
    assert plan["batches"] == 4 and plan["files"] == 12
    assert _rows(a) == _rows(b) and len(_rows(a)) == 9
    assert rep_a.to_json()["counts"] == rep_b.to_json()["counts"] == {
        "seen": 12, "ingested": 9, "rejected": 2, "skipped": 1,
    }
    assert [(f.path, f.status, f.reason, f.ids) for f in rep_a.files] == [
        (f.path, f.status, f.reason, f.ids) for f in rep_b.files
    ]
    dup = next(f for f in rep_b.files if f.path.endswith("dup_of_00.png"))
    assert dup.status == "skipped" and "duplicate" in (dup.reason or "")
    # The staging folder is gone after the commit: nothing of the run is left beside the store.
    assert not (tmp_path / "b" / "_medvae" / "staging" / "run1").exists()
    assert b.history()[-1].lineage["rows_added"] == 9


def test_batched_reingest_skips_known_content_without_a_version(tree: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "s")
    _batched([tree], store, cfg, batch_files=5, order=None)
    _, again = _batched([tree], store, cfg, batch_files=5, order=None)
    assert again.version is None and again.counts["skipped"] == 10 and again.counts["rejected"] == 2
    assert store.version() == 0


def test_commit_refuses_a_missing_batch(tree: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "s")
    staging = staging_uri(store.uri, "r")
    prepare_batches([tree], store, cfg, staging, 4)
    decode_batch(staging, 0, store, cfg)
    with pytest.raises(StoreError, match=r"batch 1 .* no decoded output"):
        commit_batches(staging, store, cfg)
    assert not store.exists()  # nothing half-committed


def test_staged_files_hold_neither_pixels_of_rejects_nor_the_key(tree: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "s")
    staging = staging_uri(store.uri, "r")
    prepare_batches([tree], store, cfg, staging, 4)
    key_hex = (tmp_path / "s" / "_medvae" / "store.key").read_text().strip()
    for f in Path(staging).iterdir():
        assert key_hex.encode() not in f.read_bytes() and bytes.fromhex(key_hex) not in f.read_bytes()
    batch0 = json.loads((Path(staging) / "batch-000000.json").read_text())["files"]
    assert all(Path(e[2]).is_absolute() for e in batch0)  # workers elsewhere read by absolute path


def test_known_ids_membership_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    ids = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(500)]
    known = KnownIds(ids[:250])
    assert len(known) == 250
    assert all(i in known for i in ids[:250]) and not any(i in known for i in ids[250:])
    # Ids ending in zero bytes survive numpy's fixed-width bytes (which strip trailing NULs on read).
    odd = "ab" + "00" * 31
    back = KnownIds.from_bytes(KnownIds([odd, *ids[:3]]).to_bytes())
    assert odd in back and ids[0] in back and ids[300] not in back and "cd" + "00" * 31 not in back
    assert "not-hex" not in KnownIds() and 3 not in known


def test_known_ids_from_an_arrow_column_equal_those_from_strings() -> None:
    """The vectorised hex decoding of a store's source_id column: nulls, several chunks, a sliced chunk,
    upper-case hex, trailing zero bytes, and ids of another length (the general path)."""
    import pyarrow as pa

    rng = np.random.default_rng(1)
    ids = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(300)]
    ids += ["ab" + "00" * 31, ids[5].upper()]
    col = pa.chunked_array([pa.array([*ids[:100], None]), pa.array(["x", *ids[100:]]).slice(1)])
    np.testing.assert_array_equal(KnownIds.from_arrow(col).prefixes(), KnownIds(ids).prefixes())
    assert len(KnownIds.from_arrow(pa.chunked_array([], pa.string()))) == 0
    short = pa.chunked_array([pa.array(["ab" * 16, None])])  # 32 hex digits, not 64
    assert "ab" * 16 + "00" * 16 in KnownIds.from_arrow(short)
    with pytest.raises(ValueError):
        KnownIds.from_arrow(pa.chunked_array([pa.array(["zz" * 32])]))
