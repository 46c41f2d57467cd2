from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from medvae.data.store import (
    SCHEMA,
    Store,
    StoreError,
    brief,
    check_safe_commits,
    empty_rows,
    images_from,
    is_local,
    is_s3,
    lineage,
    to_arrow,
)


def _rows(ids: list[str], label: str = "normal") -> pa.Table:
    buf = empty_rows()
    rng = np.random.default_rng(0)
    for i in ids:
        buf["id"].append(i)
        buf["height"].append(64)
        buf["width"].append(64)
        buf["pixels"].append(rng.integers(0, 256, (64, 64), dtype=np.uint8).tobytes())
        buf["origin"].append("real")
        buf["label"].append(label)
    return to_arrow(buf)


def test_versions_are_atomic_and_time_travel(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    assert not s.exists()
    assert s.insert_new(_rows(["a", "b"]), lineage("ingest", {"x": 1}, counts={"seen": 2})) == 0
    assert s.insert_new(_rows(["b", "c", "d"]), lineage("ingest", {})) == 1
    assert s.insert_new(_rows(["a", "c"]), lineage("ingest", {})) is None or s.version() == 1
    assert s.version() == 1
    assert s.read(version=0).num_rows == 2
    assert sorted(s.read().column("id").to_pylist()) == ["a", "b", "c", "d"]
    hist = s.history()
    assert [h.rows for h in hist] == [2, 4]
    assert hist[0].operation == "ingest"
    assert hist[0].lineage["config"] == {"x": 1} and hist[0].lineage["counts"] == {"seen": 2}
    assert hist[0].lineage["medvae_version"]


def test_upsert_updates_scores_and_inserts_in_one_version(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    s.insert_new(_rows(["a", "b"]), lineage("ingest", {}))
    upd = _rows(["a", "syn1"]).to_pydict()
    upd["anomaly_score"] = [1.5, None]
    upd["origin"] = ["real", "synthetic"]
    v = s.upsert(pa.table(upd, schema=SCHEMA), lineage("pipeline", {}), ["anomaly_score"])
    assert v == 1
    got = dict(zip(*s.read(columns=["id", "anomaly_score"]).to_pydict().values(), strict=True))
    assert got == {"a": 1.5, "b": None, "syn1": None}
    assert s.read(version=0).num_rows == 2


def test_read_filters_and_images(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    s.insert_new(_rows(["a", "b"], "normal"), lineage("ingest", {}))
    s.insert_new(_rows(["c"], "pneumonia"), lineage("ingest", {}))
    t = s.read(where={"label": "pneumonia"})
    assert t.column("id").to_pylist() == ["c"]
    imgs = images_from(s.read())
    assert imgs.shape == (3, 64, 64) and imgs.dtype == np.uint8
    with pytest.raises(StoreError, match="cannot filter"):
        s.read(where={"nope": "x"})


def test_errors_name_the_store_and_the_fix(tmp_path: Path) -> None:
    s = Store(tmp_path / "missing")
    with pytest.raises(StoreError, match="medvae ingest"):
        s.version()
    s2 = Store(tmp_path / "store")
    s2.insert_new(_rows(["a"]), lineage("ingest", {}))
    with pytest.raises(StoreError, match=r"versions 0\.\.0"):
        s2.read(version=5)


def test_key_is_private_and_stable(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    k = s.key()
    assert len(k) == 32 and s.key() == k and Store(tmp_path / "store").key() == k
    mode = (tmp_path / "store" / "_medvae" / "store.key").stat().st_mode & 0o777
    assert mode == 0o600


def test_uri_kinds() -> None:
    assert is_local("/data/store") and is_local("file:///data/store") and not is_local("s3://b/p")
    assert is_s3("s3://b/p") and is_s3("S3A://b/p") and not is_s3("/data/s3") and not is_s3("gs://b/p")


def test_unsafe_s3_commit_settings_are_refused_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks run before any I/O; the endpoint is a closed loopback port so that a missing check
    fails fast instead of reaching for AWS."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_S3_LOCKING_PROVIDER", "dynamodb")
    remote = Store("s3://medvae-nowhere/store")
    with pytest.raises(StoreError, match=r"AWS_S3_LOCKING_PROVIDER=dynamodb.*no longer supports"):
        remote.insert_new(_rows(["a"]), lineage("ingest", {}))
    with pytest.raises(StoreError, match="unset AWS_S3_LOCKING_PROVIDER"):
        remote.upsert(_rows(["a"]), lineage("pipeline", {}), ["anomaly_score"])
    # Only S3 commits depend on it: a local store writes as ever.
    assert Store(tmp_path / "store").insert_new(_rows(["a"]), lineage("ingest", {})) == 0
    monkeypatch.delenv("AWS_S3_LOCKING_PROVIDER")
    off = Store("s3://medvae-nowhere/store", storage_options={"aws_conditional_put": "Disabled"})
    with pytest.raises(StoreError, match="aws_conditional_put=disabled"):
        off.insert_new(_rows(["a"]), lineage("ingest", {}))
    check_safe_commits("s3://medvae-nowhere/store", {"aws_conditional_put": "etag"})  # the default: fine


def test_object_store_errors_are_one_plain_line() -> None:
    raw = OSError(
        "Generic S3 error\n  \x1b[31m↳\x1b[0m Error performing list request\n   \x1b[31m↳\x1b[0m 404"
    )
    assert brief(raw) == "Generic S3 error Error performing list request 404"


# ------------------------------------------------------------------------------ what a write committed
def test_insert_new_returns_the_version_and_the_ids_it_really_added(tmp_path: Path) -> None:
    import pickle

    s = Store(tmp_path / "store")
    first = s.insert_new(_rows(["a", "b"]), lineage("ingest", {}, rows_added=2))
    assert first == 0 and first is not None and first.ids == {"a", "b"}
    second = s.insert_new(_rows(["b", "c", "d"]), lineage("ingest", {}, rows_added=3))
    assert second is not None and second.version == 1 and second.ids == {"c", "d"}
    assert s.history()[1].lineage["rows_added"] == 2  # corrected from the 3 the caller offered
    assert pickle.loads(pickle.dumps(second)).ids == {"c", "d"} and json.dumps(second) == "1"
    assert s.insert_new(_rows(["a", "d"]), lineage("ingest", {})) is None and s.version() == 1


def test_insert_new_lineage_can_depend_on_what_is_added(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    s.insert_new(_rows(["a"]), lineage("ingest", {}))
    seen: list[frozenset[str]] = []

    def meta(added: frozenset[str]) -> dict[str, object]:
        seen.append(added)
        return lineage("ingest", {}, rows_added=len(added), names=sorted(added))

    assert s.insert_new(_rows(["a", "b", "c"]), meta) == 1
    assert seen == [frozenset({"b", "c"})] and s.history()[1].lineage["names"] == ["b", "c"]


# ------------------------------------------------------------------------------ paths that are no store
def _one_line_store_error(fn: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(StoreError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 600, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_a_file_is_not_a_store_at_every_entry_point(tmp_path: Path) -> None:
    f = tmp_path / "scan.dcm"
    f.write_bytes(b"x" * 10)
    s = Store(f)
    for call in (
        s.exists,
        s.version,
        s.history,
        s.read,
        s.ids,
        s.image_settings,
        s.key,
        lambda: s.insert_new(_rows(["a"]), lineage("ingest", {})),
        lambda: s.upsert(_rows(["a"]), lineage("pipeline", {}), ["anomaly_score"]),
    ):
        _one_line_store_error(call, str(f), "is a file, not a medvae store")
    assert f.read_bytes() == b"x" * 10  # nothing was written into or beside it
    _one_line_store_error(Store(f / "store").key, "is a file")


def test_a_folder_of_other_things_is_not_a_store(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    (scans / "normal").mkdir(parents=True)
    (scans / "normal" / "a.png").write_bytes(b"png")
    s = Store(scans)
    for call in (s.exists, s.version, s.history, s.read, lambda: s.insert_new(_rows(["a"]), {})):
        _one_line_store_error(call, str(scans), "exists but is not a medvae store (no _delta_log)")
    assert sorted(p.name for p in scans.iterdir()) == ["normal"]  # no table created among the scans
    (tmp_path / "odd" / "_delta_log").parent.mkdir()
    (tmp_path / "odd" / "_delta_log").write_text("")
    _one_line_store_error(Store(tmp_path / "odd").version, "_delta_log is a file")


def test_a_store_caught_mid_create_is_a_store_to_create(tmp_path: Path) -> None:
    """Another writer's first version half-written: its key, a data file and one still staged under
    delta-rs's ``<name>.parquet#<n>`` (renamed into place when written) must not read as a foreign folder."""
    other = Store(tmp_path / "store")
    other.key()
    (tmp_path / "store" / "part-00000-a-c000.snappy.parquet").write_bytes(b"")
    (tmp_path / "store" / "part-00000-b-c000.snappy.parquet#1").write_bytes(b"")
    assert not Store(tmp_path / "store").exists()
    (tmp_path / "store" / "notes.txt#1").write_bytes(b"")  # anything else still makes it foreign
    _one_line_store_error(Store(tmp_path / "store").exists, "exists but is not a medvae store")


def test_new_empty_and_key_only_folders_are_stores_to_create(tmp_path: Path) -> None:
    for name in ("new", "empty", "keyonly"):
        s = Store(tmp_path / name)
        if name != "new":
            (tmp_path / name).mkdir()
        if name == "keyonly":
            s.key()  # an ingest that died between creating the key and its first version
        assert not s.exists() and s.ids() == set()
        _one_line_store_error(s.version, "no medvae store at", "medvae ingest")
        assert s.insert_new(_rows(["a"]), lineage("ingest", {})) == 0


def test_a_log_delta_rs_cannot_read_is_one_line(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    s.insert_new(_rows(["a"]), lineage("ingest", {}))
    (tmp_path / "store" / "_delta_log" / "00000000000000000000.json").write_text("{not json\n")
    _one_line_store_error(s.history, str(tmp_path / "store"))


# ------------------------------------------------------------------------------------- failed writes
def test_brief_strips_every_escape_and_control_character() -> None:
    raw = "a\x1b[1;31mb\x1b[0m\x1b]0;title\x07c\x1b]8;;http://x\x1b\\d\x1bMe\x00f\x7fg\r\n  ↳ h\t i"
    assert brief(raw) == "abcde f g h i"  # escapes vanish, control characters become spaces
    assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in brief(raw))


class _FailingMerge:
    """Stands in for delta-rs's merge builder: writes a data file into the table, then fails like a full
    disk does between the data file and the log entry (with delta-rs's coloured message)."""

    def __init__(self, root: Path, also: Callable[[], None] | None = None) -> None:
        self.root, self.also = root, also

    def when_not_matched_insert_all(self) -> _FailingMerge:
        return self

    def execute(self) -> None:
        (self.root / "part-00000-0f0f0f0f-dead-beef-0000-000000000000-c000.snappy.parquet").write_bytes(
            b"PAR1"
        )
        if self.also is not None:
            self.also()
        raise OSError(
            "Generic LocalFileSystem error\n  \x1b[31m↳\x1b[0m Unable to copy data to file\n"
            "   \x1b[31m↳\x1b[0m No space left on device (os error 28)\n"
        )


def _data_files(root: Path) -> set[str]:
    return {p.name for p in root.glob("*.parquet")}


def test_a_failed_commit_removes_its_orphan_and_says_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    s = Store(root)
    s.insert_new(_rows(["a"]), lineage("ingest", {}))
    before = _data_files(root)
    monkeypatch.setattr(DeltaTable, "merge", lambda self, *a, **k: _FailingMerge(root))
    msg = _one_line_store_error(
        lambda: s.insert_new(_rows(["b"]), lineage("ingest", {})),
        "the disk is full",
        str(root),
        "os error 28",
    )
    assert "↳" not in msg
    monkeypatch.undo()
    assert _data_files(root) == before and s.version() == 0 and s.read().num_rows == 1


def test_cleanup_never_touches_files_a_concurrent_writer_committed_or_is_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import os

    root = tmp_path / "store"
    s = Store(root)
    s.insert_new(_rows(["a"]), lineage("ingest", {}))
    real_merge = DeltaTable.merge

    def other_writer_commits() -> None:  # another process commits v1 while this write is failing
        monkeypatch.setattr(DeltaTable, "merge", real_merge)
        Store(root).insert_new(_rows(["z"]), lineage("ingest", {}))

    monkeypatch.setattr(DeltaTable, "merge", lambda self, *a, **k: _FailingMerge(root, other_writer_commits))
    _one_line_store_error(lambda: s.insert_new(_rows(["b"]), lineage("ingest", {})), "disk is full")
    monkeypatch.setattr(DeltaTable, "merge", real_merge)
    assert s.version() == 1 and sorted(s.read().column("id").to_pylist()) == ["a", "z"]  # v1's file kept
    assert "part-00000-0f0f0f0f-dead-beef-0000-000000000000-c000.snappy.parquet" not in _data_files(root)
    # While another writer holds the write lock, a failed write leaves its file: it might be theirs.
    fd = os.open(root / "_medvae" / "write.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        monkeypatch.setattr(DeltaTable, "merge", lambda self, *a, **k: _FailingMerge(root))
        _one_line_store_error(lambda: s.insert_new(_rows(["c"]), lineage("ingest", {})), "disk is full")
    finally:
        os.close(fd)
    assert "part-00000-0f0f0f0f-dead-beef-0000-000000000000-c000.snappy.parquet" in _data_files(root)


ENOSPC_SCRIPT = r"""
import json, os, pathlib, shutil, sys
import numpy as np
from medvae.data.store import Store, StoreError, empty_rows, lineage, to_arrow, _data_files

mnt = pathlib.Path(sys.argv[1])
removed = []
real_unlink = pathlib.Path.unlink
def unlink(self, missing_ok=False):
    if self.suffix == ".parquet":
        removed.append(self.name)
    return real_unlink(self, missing_ok=missing_ok)
pathlib.Path.unlink = unlink

def rows(ids):
    b, rng = empty_rows(), np.random.default_rng(len(ids))
    for i in ids:
        b["id"].append(i); b["height"].append(64); b["width"].append(64); b["origin"].append("real")
        b["pixels"].append(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())  # incompressible
    return to_arrow(b)

def free():
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize

big = rows([f"x{i}" for i in range(100)])
cal = Store(mnt / "cal"); cal.insert_new(rows(["a"]), {})
f0 = free(); cal.insert_new(big, {}); need = f0 - free(); shutil.rmtree(mnt / "cal")
out = []
for n, short in enumerate(range(-4096, need, 4096)):  # from just too little to far too little
    store = Store(mnt / f"s{n}"); store.insert_new(rows(["a"]), {})
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free() - (need - short - 4096)))
    removed.clear()
    try:
        store.insert_new(big, {})
        msg = None
    except StoreError as exc:
        msg = str(exc)
    root = mnt / f"s{n}"
    files = _data_files(root)
    out.append({"msg": msg, "version": store.version(), "files": len(files), "removed": list(removed)})
    filler.unlink(); shutil.rmtree(root)
    if len(out) >= 12:
        break
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_real_full_disk_leaves_the_prior_version_and_no_orphan(tmp_path: Path) -> None:
    """A real ENOSPC from delta-rs, on a small tmpfs mounted in a private user and mount namespace
    (``unshare -rm``: no privileges needed where user namespaces are enabled; skipped elsewhere). Free
    space is stepped page by page below what one write needs, so that some attempts fail while writing
    the data file and some after it, writing the log entry: the case that used to leave an orphan."""
    import os
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "enospc.py"
    script.write_text(ENOSPC_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RUST_BACKTRACE": "0"}
    cmd = f"mount -t tmpfs -o size=3m tmpfs {mnt} && exec {sys.executable} {script} {mnt}"
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0 and ("mount" in proc.stderr or "unshare" in proc.stderr) and not proc.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    attempts = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [a for a in attempts if a["msg"] is not None]
    assert failed, attempts
    for a in failed:
        assert a["version"] == 0 and a["files"] == 1, a  # the prior version, and its one data file only
        assert "disk is full" in a["msg"] and "\x1b" not in a["msg"] and "\n" not in a["msg"], a
    assert any(a["removed"] for a in failed), f"no attempt hit the log-entry write: {attempts}"


def test_a_committed_version_prints_as_its_number(tmp_path: Path) -> None:
    """Messages say "version 0", never the repr (augment once printed "version Committed(version=1, ...)")."""
    v = Store(tmp_path / "store").insert_new(_rows(["a", "b"]), lineage("ingest", {}))
    assert f"version {v}" == "version 0" and str(v) == "0" and f"{v:>3}" == "  0"
    assert v.ids == {"a", "b"} and "ids=2" in repr(v)
