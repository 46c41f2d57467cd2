"""Stores on S3: every Store operation, the race-free key, concurrent writers, and ingest → train → augment →
export (and the CLI) against a loopback moto server.

The server (tests/s3server.py) runs in a child process on 127.0.0.1 with a free port; each test gets its
own bucket and its own AWS_* environment (monkeypatched, so nothing leaks). Spawned writer processes
inherit that environment, exactly as a second medvae command on the same machine would.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.crashkit import audit_store, concurrent_inserts, expected_ids, fake_rows, store_ids
from tests.s3server import S3Server, s3_server

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "medvae-test", "AWS_SECRET_ACCESS_KEY": "medvae-test-secret"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3server") / "audit.tsv") as srv:
        yield srv


def _clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own AWS settings (a profile, a real endpoint, a locking provider) must not reach
    # the test, nor the test's settings outlive it.
    for name in list(os.environ):
        if name.upper().startswith("AWS_") or name.upper() in ("CONDITIONAL_PUT", "DELTA_DYNAMO_TABLE_NAME"):
            monkeypatch.delenv(name)


def _s3(server: S3Server) -> Any:
    """A boto3 client of the test server, configured explicitly (never from the environment)."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def _bucket(server: S3Server) -> str:
    name = f"medvae-{uuid.uuid4().hex[:16]}"
    _s3(server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_uri(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store URI in a fresh bucket, configured the standard way: AWS_* environment variables only."""
    _clean_aws_env(monkeypatch)
    for name, value in {
        **CREDENTIALS,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ALLOW_HTTP": "true",  # the loopback endpoint is plain http
    }.items():
        monkeypatch.setenv(name, value)
    return f"s3://{_bucket(server)}/datasets/cxr"


def _keys(server: S3Server, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = _s3(server).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix + "/") for page in pages for o in page.get("Contents", []))


def _assert_commits_were_conditional(server: S3Server, uri: str) -> None:
    """Every log entry the store (and its key table) got was a PUT with If-None-Match: * ."""
    puts = server.conditional_puts(uri.removeprefix("s3://"))
    log_puts = [(k, v) for k, v in puts if "/_delta_log/" in k and k.endswith(".json")]
    assert log_puts, puts
    assert all(v == "*" for _, v in log_puts), [p for p in log_puts if p[1] != "*"]


# ------------------------------------------------------------------------------------------- the emulator
def test_the_test_server_refuses_a_second_conditional_create(server: S3Server) -> None:
    """The guarantee below rests on If-None-Match: * ; check that the emulator really enforces it."""
    client, bucket = _s3(server), _bucket(server)
    client.put_object(Bucket=bucket, Key="x", Body=b"first", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key="x", Body=b"second", IfNoneMatch="*")
    assert client.get_object(Bucket=bucket, Key="x")["Body"].read() == b"first"


# ------------------------------------------------------------------------------------------ store level
def test_every_store_operation_on_s3(s3_uri: str, server: S3Server) -> None:
    from medvae.data.store import SCHEMA, Store, StoreError, lineage

    s = Store(s3_uri)
    assert not s.exists() and s.ids() == set()
    with pytest.raises(StoreError, match="medvae ingest"):
        s.version()
    assert s.insert_new(fake_rows(["a", "b", "c"]), lineage("ingest", {"n": 1}, rows_added=3)) == 0
    # The de-duplicating merge: only d and e are new, and lineage says so.
    assert s.insert_new(fake_rows(["b", "c", "d", "e"]), lineage("ingest", {}, rows_added=4)) == 1
    assert s.insert_new(fake_rows(["a", "e"]), lineage("ingest", {}, rows_added=2)) is None
    upd = fake_rows(["a", "syn1"]).to_pydict()
    upd["anomaly_score"] = [0.5, None]
    upd["origin"] = ["real", "synthetic"]
    assert s.upsert(pa.table(upd, schema=SCHEMA), lineage("pipeline", {}), ["anomaly_score"]) == 2

    assert s.exists() and s.version() == 2
    assert s.ids("id") == {"a", "b", "c", "d", "e", "syn1"}
    assert sorted(s.read(version=0).column("id").to_pylist()) == ["a", "b", "c"]  # time travel
    assert sorted(s.read(version=1).column("id").to_pylist()) == ["a", "b", "c", "d", "e"]
    assert s.read(where={"origin": "synthetic"}, columns=["id"]).column("id").to_pylist() == ["syn1"]
    scores = dict(zip(*s.read(columns=["id", "anomaly_score"]).to_pydict().values(), strict=True))
    assert scores["a"] == 0.5 and scores["b"] is None
    with pytest.raises(StoreError, match=r"versions 0\.\.2"):
        s.read(version=7)

    hist = s.history()
    assert [h.version for h in hist] == [0, 1, 2]
    assert [h.rows for h in hist] == [3, 5, 6]
    assert [h.operation for h in hist] == ["ingest", "ingest", "pipeline"]
    assert hist[0].lineage["config"] == {"n": 1}
    assert hist[1].lineage["rows_added"] == 2 and hist[1].lineage["rows_already_present"] == 2
    assert s.image_settings() is None  # no version ingested real scans
    assert audit_store(s3_uri) == []

    # The key: created with the store, stable, and a Delta table of one row under _medvae/key.
    key = s.key()
    assert len(key) == 32 and Store(s3_uri).key(create=False) == key
    keys = _keys(server, s3_uri)
    assert "_medvae/key/_delta_log/00000000000000000000.json" in keys
    assert not any(k.startswith("_medvae/") and "key/" not in k for k in keys), keys
    _assert_commits_were_conditional(server, s3_uri)


def test_explicit_storage_options_work_without_environment(
    server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medvae.data.store import Store, lineage

    _clean_aws_env(monkeypatch)
    uri = f"s3://{_bucket(server)}/opts"
    options = {
        **CREDENTIALS,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    s = Store(uri, storage_options=options)
    assert s.insert_new(fake_rows(["a"]), lineage("ingest", {})) == 0
    assert s.insert_new(fake_rows(["b"]), lineage("ingest", {})) == 1
    assert [h.rows for h in s.history()] == [1, 2] and len(s.key()) == 32
    assert Store(uri, storage_options=options).key(create=False) == s.key()


def test_an_unreachable_bucket_is_a_clear_error(s3_uri: str) -> None:
    from medvae.data.store import Store, StoreError, lineage

    missing = "s3://medvae-no-such-bucket/x"
    for call in (
        lambda: Store(missing).exists(),
        lambda: Store(missing).read(),
        lambda: Store(missing).insert_new(fake_rows(["a"]), lineage("ingest", {})),
    ):
        with pytest.raises(
            StoreError, match=r"cannot reach store s3://medvae-no-such-bucket/x.*AWS_ENDPOINT_URL"
        ):
            call()


def test_settings_that_would_make_commits_unsafe_are_refused(
    s3_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medvae.data.store import Store, StoreError, lineage

    s = Store(s3_uri)
    s.insert_new(fake_rows(["a"]), lineage("ingest", {}))
    # deltalake 1.x ignores the DynamoDB lock; medvae says so instead of writing without the lock.
    monkeypatch.setenv("AWS_S3_LOCKING_PROVIDER", "dynamodb")
    monkeypatch.setenv("DELTA_DYNAMO_TABLE_NAME", "delta_log")
    with pytest.raises(StoreError, match="unset AWS_S3_LOCKING_PROVIDER"):
        s.insert_new(fake_rows(["b"]), lineage("ingest", {}))
    with pytest.raises(StoreError, match="AWS_S3_LOCKING_PROVIDER"):
        Store(s3_uri.replace("cxr", "new")).key()
    assert s.read().num_rows == 1  # reading needs no lock
    monkeypatch.delenv("AWS_S3_LOCKING_PROVIDER")
    off = Store(s3_uri, storage_options={"conditional_put": "disabled"})
    with pytest.raises(StoreError, match="conditional_put=disabled"):
        off.upsert(fake_rows(["b"]), lineage("pipeline", {}), ["anomaly_score"])
    assert s.version() == 0


def test_a_key_copied_from_a_local_store_takes_precedence(s3_uri: str, server: S3Server) -> None:
    from medvae.data.store import Store, StoreError

    with pytest.raises(StoreError, match="has no key"):
        Store(s3_uri).key(create=False)
    bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
    key = bytes(range(32))
    _s3(server).put_object(Bucket=bucket, Key=f"{prefix}/_medvae/store.key", Body=key.hex().encode())
    assert Store(s3_uri).key(create=False) == key and Store(s3_uri).key() == key
    assert not any(k.startswith("_medvae/key/") for k in _keys(server, s3_uri))  # no second key made


# ------------------------------------------------------------------------------------------ concurrency
def test_the_loser_of_the_key_race_uses_the_winners_key(
    s3_uri: str, server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race made deterministic: a writer that saw no key, lost the create, must read the winner's."""
    from medvae.data.store import Store

    winner = Store(s3_uri).key()
    real = Store._read_key_table
    calls = {"n": 0}

    def stale_first(self: Store) -> bytes | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else real(self)

    monkeypatch.setattr(Store, "_read_key_table", stale_first)
    assert Store(s3_uri).key() == winner and calls["n"] == 2
    monkeypatch.undo()
    log = [k for k in _keys(server, s3_uri) if k.startswith("_medvae/key/_delta_log/")]
    assert log == ["_medvae/key/_delta_log/00000000000000000000.json"], log


@pytest.mark.slow  # many writers against the S3 test server: ~25 s
def test_concurrent_writers_on_s3_lose_and_duplicate_nothing(s3_uri: str, server: S3Server) -> None:
    """Three writers create the same new store (and its key) at once, then three more append to it."""
    from medvae.data.store import Store

    first = [list("abcdefgh"), list("efghijkl"), list("ijklmnop")]
    results = concurrent_inserts(s3_uri, first, timeout=180)  # type: ignore[arg-type]
    assert all(r[0] == "ok" for r in results), results
    assert sorted(store_ids(s3_uri)) == list("abcdefghijklmnop")  # type: ignore[arg-type]
    # The racing creators made one key between them: one create of the key table, one row in it.
    log = [k for k in _keys(server, s3_uri) if k.startswith("_medvae/key/_delta_log/")]
    assert log == ["_medvae/key/_delta_log/00000000000000000000.json"], log
    assert len(Store(s3_uri).key(create=False)) == 32

    second = [[f"{w}{i}" for i in range(6)] for w in "qrs"]
    results = concurrent_inserts(s3_uri, second, timeout=180)  # type: ignore[arg-type]
    assert all(r[0] == "ok" for r in results), results
    ids = store_ids(s3_uri)  # type: ignore[arg-type]
    assert len(ids) == len(set(ids)) == 16 + 18
    assert audit_store(s3_uri) == []  # type: ignore[arg-type]
    hist = Store(s3_uri).history()
    assert [h.version for h in hist] == list(range(len(hist)))
    assert sum(int(h.lineage.get("rows_added", 0)) for h in hist) == len(ids)
    _assert_commits_were_conditional(server, s3_uri)


# ---------------------------------------------------------------------------------------- whole pipeline
def _sources(shared_data: Path, root: Path) -> tuple[Path, list[Path]]:
    """~20 real chest X-rays, two self-made PNGs, and two files that must be rejected."""
    good: list[Path] = []
    for label, n in (("normal", 12), ("pneumonia", 8)):
        (root / label).mkdir(parents=True)
        for p in sorted((shared_data / "kermany_train" / label).glob("*.jpeg"))[-n:]:
            good.append(Path(shutil.copy(p, root / label / p.name)))
    rng = np.random.default_rng(7)
    for i in range(2):
        p = root / "normal" / f"made-{i}.png"
        Image.fromarray(rng.integers(0, 256, (80, 96), dtype=np.uint8)).save(p)
        good.append(p)
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "pneumonia" / "empty.jpeg").write_bytes(b"")
    return root, good


@pytest.mark.usefixtures("one_torch_thread")
def test_ingest_train_augment_export_on_s3(
    s3_uri: str, server: S3Server, shared_data: Path, tmp_path: Path
) -> None:
    from medvae.config import AugmentConfig, IngestConfig, ModelConfig, TrainConfig
    from medvae.data.export import export
    from medvae.data.ingest import ingest
    from medvae.data.store import Store
    from medvae.jobs.augment import augment_job
    from medvae.jobs.train import train_job

    src, good = _sources(shared_data, tmp_path / "src")
    rep = ingest([src], Store(s3_uri), IngestConfig(workers=1))
    assert rep.version == 0
    assert rep.counts["ingested"] == len(good) and rep.counts["rejected"] == 2, rep.counts
    assert set(store_ids(s3_uri)) == expected_ids(s3_uri, good)  # type: ignore[arg-type]
    again = ingest([src], Store(s3_uri), IngestConfig(workers=1))  # same content: skipped, no new version
    assert again.version is None and again.counts["skipped"] == len(good)

    tiny = TrainConfig(
        epochs=1, batch_size=8, patience=1, device="cpu", model=ModelConfig(channels=(8, 16), latent_dim=8)
    )
    model = tmp_path / "model"
    trained = train_job(s3_uri, model, tiny, progress=False)
    assert trained.dataset_version == 0
    stats = augment_job(model, s3_uri, AugmentConfig(count=8, privacy_quantile=0.0))
    assert stats.version == 1 and stats.kept > 0

    store = Store(s3_uri)
    hist = store.history()
    assert [h.version for h in hist] == [0, 1]
    assert [h.operation for h in hist] == ["ingest", "augment"]
    assert [h.rows for h in hist] == [len(good), len(good) + stats.kept]
    assert hist[0].lineage["counts"]["rejected"] == 2 and hist[0].lineage["rows_added"] == len(good)
    assert hist[1].lineage["model_hash"] == stats.model_hash == trained.model_hash
    assert store.image_settings() is not None
    v0, latest = store.read(version=0), store.read()
    assert set(v0.column("origin").to_pylist()) == {"real"}
    assert latest.column("origin").to_pylist().count("synthetic") == stats.kept

    # Export an older version and the latest to local folders.
    old = list(csv.DictReader(export(store, tmp_path / "export-v0", version=0).open()))
    new = list(csv.DictReader(export(store, tmp_path / "export-latest").open()))
    assert len(old) == len(good) and len(new) == len(good) + stats.kept
    assert {r["origin"] for r in old} == {"real"} and {r["label"] for r in old} == {"normal", "pneumonia"}
    row = old[0]
    want = dict(zip(v0.column("id").to_pylist(), v0.column("pixels").to_pylist(), strict=True))
    png = np.asarray(Image.open(tmp_path / "export-v0" / row["path"]))
    assert png.tobytes() == want[row["id"]]  # lossless
    assert audit_store(s3_uri) == []  # type: ignore[arg-type]
    _assert_commits_were_conditional(server, s3_uri)


def test_batched_ingest_stages_beside_an_s3_store(s3_uri: str, server: S3Server, tmp_path: Path) -> None:
    """The task-runner form of ingest keeps its staging files under ``<store>/_medvae/staging/`` on S3
    too, and removes them after the one commit."""
    from medvae.config import IngestConfig
    from medvae.data.ingest import commit_batches, decode_batch, prepare_batches
    from medvae.data.staging import staging_uri
    from medvae.data.store import Store

    rng = np.random.default_rng(3)
    for i in range(5):
        (tmp_path / "src" / "normal").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(
            tmp_path / "src" / "normal" / f"{i}.png"
        )
    store, cfg = Store(s3_uri), IngestConfig(workers=1)
    staging = staging_uri(s3_uri, "run1")
    plan = prepare_batches([tmp_path / "src"], store, cfg, staging, batch_files=2)
    assert plan["batches"] == 3
    for i in reversed(range(plan["batches"])):
        decode_batch(staging, i, Store(s3_uri), cfg)  # a worker elsewhere: its own Store, reading the key
    rep = commit_batches(staging, store, cfg)
    assert rep.version == 0 and rep.rows_added == 5 and store.read().num_rows == 5
    assert not any(k.startswith("_medvae/staging/run1/") for k in _keys(server, s3_uri))


def test_export_refuses_a_uri_as_its_folder(tmp_path: Path) -> None:
    from medvae.data.export import export
    from medvae.data.store import Store

    with pytest.raises(ValueError, match="local folder"):
        export(Store(tmp_path / "store"), Path("s3://bucket/exports"))  # Path() folds it to s3:/bucket/...
    assert not (Path.cwd() / "s3:").exists()


def test_cli_on_s3(s3_uri: str, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from medvae.cli import app

    rng = np.random.default_rng(0)
    for label in ("normal", "abnormal"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(
                tmp_path / "src" / label / f"{i}.png"
            )
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--store", s3_uri, "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"version 0 of {s3_uri}" in res.output
    res = runner.invoke(app, ["versions", "--store", s3_uri, "--json"])
    assert res.exit_code == 0, res.output
    assert [v["rows"] for v in json.loads(res.stdout)] == [6]
    res = runner.invoke(app, ["export", "--store", s3_uri, "--out", str(tmp_path / "out"), "--version", "0"])
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))) == 6
    res = runner.invoke(app, ["versions", "--store", "s3://medvae-no-such-bucket/x"])
    assert res.exit_code == 1 and "cannot reach store" in res.output
