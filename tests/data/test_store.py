from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medvae.data.store import (
    SCHEMA,
    Store,
    StoreError,
    _brief,
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
    assert _brief(raw) == "Generic S3 error Error performing list request 404"
