"""The stat cache: an unchanged file is skipped without being read; any change makes it read again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from medvae.config import IngestConfig
from medvae.data import ingest as ingest_mod
from medvae.data.ingest import ingest
from medvae.data.statcache import CACHE_FILE, StatCache, stat_key, stat_keys
from medvae.data.store import Store
from tests.data.test_ingest import _png


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the (in-process) decoder opens."""
    opened: list[str] = []
    real = ingest_mod._read_file

    def counting(path: str, cfg: IngestConfig) -> object:
        opened.append(Path(path).name)
        return real(path, cfg)

    monkeypatch.setattr(ingest_mod, "_read_file", counting)
    return opened


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "Patient DOE^JANE"
    for i in range(6):
        _png(root / "normal" / f"scan{i}.png", i)
    (root / "normal" / "copy_of_0.png").write_bytes((root / "normal" / "scan0.png").read_bytes())
    (root / "notes.txt").write_text("not a scan")
    return root


def test_unchanged_folder_is_skipped_without_reading_a_file(
    src: Path, tmp_path: Path, reads: list[str]
) -> None:
    store = Store(tmp_path / "store")
    first = ingest([src], store, IngestConfig(workers=1))
    assert first.counts == {"seen": 8, "ingested": 6, "rejected": 1, "skipped": 1}
    reads.clear()
    again = ingest([src], store, IngestConfig(workers=1))
    assert again.version is None and again.counts == {"seen": 8, "ingested": 0, "rejected": 1, "skipped": 7}
    assert reads == ["notes.txt"]  # only the rejected file is looked at again
    assert {f.reason for f in again.files if f.status == "skipped"} == {"already in the store (same content)"}


def test_any_change_to_a_file_makes_it_read_again(src: Path, tmp_path: Path, reads: list[str]) -> None:
    store = Store(tmp_path / "store")
    ingest([src], store, IngestConfig(workers=1))
    a, b, c = (src / "normal" / f"scan{i}.png" for i in (1, 2, 3))
    st = a.stat()
    _png(a, 100)  # new content, then the old mtime put back: ctime still moves
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(b)  # touched only: read again, found to be known content
    c.rename(c.with_name("renamed.png"))  # moved: another path
    reads.clear()
    rep = ingest([src], store, IngestConfig(workers=1))
    assert sorted(reads) == sorted(["notes.txt", "scan1.png", "scan2.png", "renamed.png"])
    st_by = {Path(f.path).name: f.status for f in rep.files}
    assert st_by["scan1.png"] == "ingested" and st_by["scan2.png"] == st_by["renamed.png"] == "skipped"
    assert rep.version == 1
    reads.clear()
    ingest([src], store, IngestConfig(workers=1))
    assert reads == ["notes.txt"]  # and now they are all remembered


def test_a_cache_entry_only_counts_while_its_content_is_in_the_store(
    src: Path, tmp_path: Path, reads: list[str]
) -> None:
    """A store rebuilt under the same key (its cache kept) has none of the rows: nothing is skipped."""
    import shutil

    store = Store(tmp_path / "store")
    ingest([src], store, IngestConfig(workers=1))
    keep = tmp_path / "kept"
    shutil.copytree(tmp_path / "store" / "_medvae", keep)
    shutil.rmtree(tmp_path / "store")
    shutil.copytree(keep, tmp_path / "store" / "_medvae")
    reads.clear()
    rep = ingest([src], store, IngestConfig(workers=1))
    assert rep.counts["ingested"] == 6 and len(reads) == 8


def test_the_cache_holds_no_path_and_survives_corruption(src: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ingest([src], store, IngestConfig(workers=1))
    cache = tmp_path / "store" / "_medvae" / CACHE_FILE
    data = cache.read_bytes()
    for needle in (b"DOE", b"JANE", b"scan", b"normal", str(tmp_path).encode()):
        assert needle not in data
    cache.write_bytes(b"garbage")
    rep = ingest([src], store, IngestConfig(workers=1))  # a broken cache is an empty cache
    assert rep.version is None and rep.counts["skipped"] == 7


def test_parallel_ingest_fills_the_cache_too(tmp_path: Path, reads: list[str]) -> None:
    root = tmp_path / "many"
    for i in range(70):
        _png(root / "x" / f"{i:03d}.png", i, size=(20, 20))
    store = Store(tmp_path / "store")
    ingest([root], store, IngestConfig(workers=2))  # decoded in pool workers (not counted here)
    rep = ingest([root], store, IngestConfig(workers=2))
    assert rep.counts["skipped"] == 70 and reads == []


def test_batched_ingest_uses_and_fills_the_cache(src: Path, tmp_path: Path) -> None:
    from medvae.data.ingest import commit_batches, decode_batch, prepare_batches
    from medvae.data.staging import staging_uri

    store = Store(tmp_path / "store")
    cfg = IngestConfig(workers=1)
    for run in ("r1", "r2"):
        staging = staging_uri(store.uri, run)
        plan = prepare_batches([src], store, cfg, staging, 3)
        for i in range(plan["batches"]):
            decode_batch(staging, i, store, cfg)
        rep = commit_batches(staging, store, cfg)
    assert plan["batches"] == 1  # the second run only had the rejected file left to decode
    assert rep.version is None and rep.counts == {"seen": 8, "ingested": 0, "rejected": 1, "skipped": 7}


def test_statcache_lookup_merge_and_round_trip() -> None:
    key = b"k" * 32
    st = os.stat(__file__)
    k1 = stat_key(key, __file__, st)
    assert len(k1) == 16 and k1 != stat_key(b"j" * 32, __file__, st) and k1 != stat_key(key, "/other", st)
    zero_tail = b"\x01" + b"\x00" * 15  # numpy's S16 strips trailing NULs on the way back to Python
    cache = StatCache().merged([(k1, zero_tail), (b"\x02" * 16, b"\x03" * 16)])
    found, prefixes = StatCache.from_bytes(cache.to_bytes()).lookup([k1, b"\x09" * 16])
    assert found.tolist() == [True, False]
    assert prefixes[0] == np.array(zero_tail, dtype="S16")
    newer = cache.merged([(k1, b"\x04" * 16)], keep=np.array([b"\x04" * 16], dtype="S16"))
    assert len(newer) == 1 and newer.lookup([k1])[1][0] == np.array(b"\x04" * 16, dtype="S16")
    assert len(StatCache.from_bytes(b"not npy")) == 0


def test_stat_keys_hash_the_absolute_path_of_relative_absolute_and_root_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "d")
    st = os.stat("f.png")
    key = b"k" * 32
    paths = ["f.png", "./f.png", "../d/f.png", str(tmp_path / "d" / "f.png"), "/f.png"]
    for path, got in zip(paths, stat_keys(key, [(p, st) for p in paths]), strict=True):
        meta = f"{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        text = f"{os.path.abspath(path)}\0{meta}"
        want = hashlib.blake2b(text.encode(), key=key, digest_size=16, person=b"medvae-stat").digest()
        assert got == want, path
    assert len(set(stat_keys(key, [(p, st) for p in paths]))) == 2  # four spellings of one file, and /f.png
