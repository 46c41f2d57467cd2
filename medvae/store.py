"""The versioned dataset: a Delta Lake table of 64×64 images with lineage in every commit."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from medvae import __version__

# The schema is planned for every stage: ingest fills the pixel, provenance and technical columns;
# augment adds synthetic rows (origin, model_hash, seed); screen fills the nullable score columns.
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string()),  # keyed hash of the source file's bytes (real rows)
        pa.field("patient_key", pa.string()),  # keyed hash of PatientID or file-name patient key
        pa.field("frame", pa.int32()),
        pa.field("height", pa.int16(), nullable=False),
        pa.field("width", pa.int16(), nullable=False),
        pa.field("pixels", pa.binary(), nullable=False),  # uint8, row-major, height*width bytes
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),  # train / val / test, by patient
        pa.field("origin", pa.string(), nullable=False),  # real / synthetic
        pa.field("model_hash", pa.string()),  # synthetic rows: the model that made them
        pa.field("seed", pa.int64()),  # synthetic rows: the sampling seed
        pa.field("source_format", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("photometric", pa.string()),
        pa.field("transfer_syntax", pa.string()),
        pa.field("sop_class", pa.string()),
        pa.field("window", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("view_position", pa.string()),
        pa.field("orig_rows", pa.int32()),
        pa.field("orig_cols", pa.int32()),
        pa.field("pixel_spacing_row", pa.float64()),
        pa.field("pixel_spacing_col", pa.float64()),
        pa.field("bits_stored", pa.int32()),
        pa.field("n_frames", pa.int32()),
        pa.field("anomaly_score", pa.float64()),  # the model's primary (latent) score
        pa.field("anomaly_percentile", pa.float64()),  # percentile among held-out normals
        pa.field("anomaly_flag", pa.bool_()),
        pa.field("score_recon", pa.float64()),
        pa.field("score_kl", pa.float64()),
        pa.field("score_model_hash", pa.string()),  # the model that produced the scores
    ]
)

SCORE_COLUMNS = (
    "anomaly_score",
    "anomaly_percentile",
    "anomaly_flag",
    "score_recon",
    "score_kl",
    "score_model_hash",
)
KEY_DIR = "_medvae"
KEY_FILE = "store.key"
# A merge reads the whole table, so delta-rs refuses to commit it over a concurrent append (another
# ingest): the merge must be re-run on the new snapshot. Bounded, so a store under constant write
# contention ends in a clear error instead of spinning.
MERGE_ATTEMPTS = 8


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the message says what to do."""


def is_local(uri: str) -> bool:
    """True when ``uri`` names a local path rather than an object-store URI."""
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def git_commit() -> str | None:
    """The git commit of the medvae checkout, when it runs from one (lineage only)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


IMAGE_SETTINGS = ("size", "aspect", "intensity", "clahe_clip_limit")


def image_settings_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The pixel-defining part of an ingest config (a dict): :data:`IMAGE_SETTINGS`, normalised.

    A missing ``intensity`` means ``none`` (stores from before the option), and the CLAHE clip limit
    only matters when CLAHE is on.
    """
    out = {k: cfg.get(k) for k in IMAGE_SETTINGS}
    out["intensity"] = out["intensity"] or "none"
    if out["intensity"] != "clahe":
        out["clahe_clip_limit"] = None
    return out


def lineage(operation: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Commit metadata recorded with every version: what ran, how, on what, by which code.

    Paths in the config (sources, label CSVs) are redacted: folder names often carry patient names.
    """
    from medvae.deid import redact_config

    return {
        "operation": operation,
        "config": redact_config(config),
        "medvae_version": __version__,
        "git_commit": git_commit(),
        **extra,
    }


@dataclass(frozen=True)
class VersionInfo:
    """One version of the store, as listed by ``medvae versions``."""

    version: int
    timestamp: int | None
    operation: str
    rows: int
    lineage: dict[str, Any]


class Store:
    """A medvae dataset: a Delta table at a local path or any URI that deltalake accepts.

    Args:
        uri: local path or object-store URI (``s3://bucket/prefix`` ...).
        storage_options: passed to deltalake for object stores (credentials, endpoint).
    """

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, str] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = storage_options

    # ---------------------------------------------------------------- key
    def key(self, create: bool = True) -> bytes:
        """The store's secret HMAC key, created on first use.

        The key lives beside the table (``_medvae/store.key``, mode 0600) and belongs to the store: whoever
        may read the store may recognise re-ingested content, but a hash cannot be reversed without it.
        """
        if not is_local(self.uri):
            return self._remote_key(create)
        path = _local_path(self.uri) / KEY_DIR / KEY_FILE
        if path.exists():
            return bytes.fromhex(path.read_text().strip())
        if not create:
            raise StoreError(f"store {self.uri} has no key ({path}); was it created by medvae?")
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
        try:
            # link() fails if another writer created the key first; then everyone uses theirs.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return bytes.fromhex(path.read_text().strip())

    def _remote_key(self, create: bool) -> bytes:
        from pyarrow import fs as pafs

        filesystem, base = pafs.FileSystem.from_uri(self.uri)
        path = f"{base.rstrip('/')}/{KEY_DIR}/{KEY_FILE}"
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            if not create:
                raise StoreError(f"store {self.uri} has no key; was it created by medvae?")
            with filesystem.open_output_stream(path) as out:
                out.write(secrets.token_bytes(32).hex().encode())
        with filesystem.open_input_stream(path) as inp:
            return bytes.fromhex(inp.read().decode().strip())

    # ---------------------------------------------------------------- read
    def exists(self) -> bool:
        """Whether a Delta table exists at the URI."""
        return bool(DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options))

    def table(self, version: int | None = None) -> DeltaTable:
        """The Delta table, at ``version`` or the latest.

        Raises:
            StoreError: when there is no table or no such version.
        """
        try:
            dt = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError as exc:
            raise StoreError(
                f"no medvae store at {self.uri}: run `medvae ingest SOURCE --store {self.uri}` first"
            ) from exc
        if version is not None:
            latest = dt.version()
            if not 0 <= version <= latest:
                raise StoreError(
                    f"store {self.uri} has versions 0..{latest}; version {version} does not exist"
                )
            dt.load_as_version(version)
        return dt

    def version(self) -> int:
        """The latest version number."""
        return self.table().version()

    def read(
        self,
        version: int | None = None,
        columns: Iterable[str] | None = None,
        where: dict[str, str] | None = None,
    ) -> pa.Table:
        """Rows of a version as an Arrow table, optionally projected and filtered by equality.

        Args:
            version: the version to read, latest when None.
            columns: the columns to return, all when None.
            where: equality filters such as ``{"label": "normal", "origin": "real"}``.
        """
        dt = self.table(version)
        cols = list(columns) if columns is not None else None
        where = where or {}
        for key in where:
            if key not in SCHEMA.names:
                raise StoreError(f"cannot filter on {key!r}: columns are {', '.join(SCHEMA.names)}")
        need = None if cols is None else sorted(set(cols) | set(where))
        table = dt.to_pyarrow_table(columns=need)
        for key, value in where.items():
            col = table.column(key)
            table = table.filter(pc.equal(pc.cast(col, pa.string()), pa.scalar(str(value))))
        return table.select(cols) if cols is not None else table

    def ids(self, column: str = "source_id") -> set[str]:
        """The distinct non-null values of one id column in the latest version (empty for a new store)."""
        if not self.exists():
            return set()
        col = self.table().to_pyarrow_table(columns=[column]).column(column)
        return {v for v in col.to_pylist() if v is not None}

    def _commits(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every commit, oldest first, as (delta-rs commit info, medvae lineage); one read of the log."""
        out = []
        for entry in sorted(self.table().history(), key=lambda e: int(e.get("version", 0))):
            raw = entry.get("medvae")
            out.append((entry, json.loads(raw) if isinstance(raw, str) else {}))
        return out

    def history(self) -> list[VersionInfo]:
        """Every version, oldest first, with its row count, operation and lineage."""
        out: list[VersionInfo] = []
        for entry, meta in self._commits():
            v = int(entry.get("version", 0))
            # Row counts need each version's snapshot: this opens one table per version.
            at = DeltaTable(self.uri, version=v, storage_options=self.storage_options)
            rows = sum(int(n) for n in at.get_add_actions(flatten=True).column("num_records").to_pylist())
            out.append(
                VersionInfo(
                    version=v,
                    timestamp=entry.get("timestamp"),
                    operation=str(meta.get("operation") or entry.get("operation", "?")),
                    rows=rows,
                    lineage=meta,
                )
            )
        return out

    def image_settings(self) -> dict[str, Any] | None:
        """The ingest settings that shaped the pixels of this store's real rows, read from its lineage.

        Every version that ingested scans records its resolved ingest config (a pipeline version nests
        it under ``ingest``). Only the settings in :data:`IMAGE_SETTINGS` change what a stored image looks
        like; they must agree across versions, or images would not be comparable. Versions written
        before ``intensity`` existed count as ``none``.

        Returns:
            The settings, or None when no version has ingested scans yet.

        Raises:
            StoreError: when versions were ingested with different settings.
        """
        found: dict[str, dict[str, Any]] = {}
        # Only the commit metadata is needed: every ingest checks this, so it must not open each version.
        for _, meta in self._commits():
            cfg = meta.get("config") or {}
            if isinstance(cfg.get("ingest"), dict):
                cfg = cfg["ingest"]
            if "aspect" in cfg and "size" in cfg:  # an ingest config: this version ingested scans
                settings = image_settings_of(cfg)
                found[json.dumps(settings, sort_keys=True)] = settings
        if len(found) > 1:
            raise StoreError(
                f"store {self.uri} mixes versions ingested with different image settings: "
                f"{sorted(found)}; its images do not compare"
            )
        return next(iter(found.values()), None)

    # ---------------------------------------------------------------- write
    def _commit(self, meta: dict[str, Any], retries: int = 10) -> CommitProperties:
        # One JSON string under one key: delta-rs keeps custom metadata as commitInfo fields, and a
        # single self-contained document is easier to read back than many flattened keys.
        return CommitProperties(
            custom_metadata={"medvae": json.dumps(meta, default=str)}, max_commit_retries=retries
        )

    def insert_new(self, rows: pa.Table, meta: dict[str, Any]) -> int | None:
        """Commit ``rows`` whose ``id`` is not yet in the store, as exactly one new version.

        A merge on ``id`` (insert when not matched) makes de-duplication part of the atomic commit, so two
        writers ingesting the same file cannot both add it.

        Returns:
            The new version, or None when there was nothing to write.
        """
        if rows.num_rows == 0:
            return None
        rows = rows.cast(SCHEMA)
        if not self.exists():
            self.key()  # the key must exist before the first version that depends on it
            try:
                write_deltalake(
                    self.uri,
                    rows,
                    mode="error",
                    name="medvae",
                    description="medvae dataset of 64x64 medical images",
                    storage_options=self.storage_options,
                    # No commit retries: when another writer creates the table first, delta-rs would
                    # otherwise retry this mode="error" write as a blind append on top of it (version 1,
                    # duplicating every shared id). Failing instead falls through to the de-duplicating merge.
                    commit_properties=self._commit(meta, retries=0),
                )
                return 0  # without retries, a successful create is version 0 (later ones may exist by now)
            except Exception as exc:  # another writer created the table first: fall through to merge
                if not self.exists():
                    raise StoreError(f"cannot create store at {self.uri}: {exc}") from exc

        def attempt(dt: DeltaTable) -> bool:
            # Keep only ids absent from the snapshot the merge runs against: the caller's view of the store
            # may be stale (a concurrent ingest committed the same files meanwhile), and lineage must
            # record the rows this version really adds, not those the caller hoped to add. Nothing new
            # means no empty version. A conflicting commit re-runs this on the newer snapshot.
            present = set(dt.to_pyarrow_table(columns=["id"]).column("id").to_pylist())
            new = rows.filter(
                pc.invert(pc.is_in(rows.column("id"), value_set=pa.array(list(present), pa.string())))
            )
            if new.num_rows == 0:
                return False
            m = dict(meta)
            if "rows_added" in m and m["rows_added"] != new.num_rows:
                m["rows_added"] = new.num_rows
                m["rows_already_present"] = rows.num_rows - new.num_rows
            (
                dt.merge(
                    new,
                    predicate="t.id = s.id",
                    source_alias="s",
                    target_alias="t",
                    commit_properties=self._commit(m),
                )
                .when_not_matched_insert_all()
                .execute()
            )
            return True

        return self._merge_retrying(attempt)

    def upsert(self, rows: pa.Table, meta: dict[str, Any], update_columns: Iterable[str]) -> int:
        """One atomic version that updates ``update_columns`` of matching ids and inserts the rest.

        The pipeline uses it to write synthetic rows and the real rows' anomaly scores together.
        """
        rows = rows.cast(SCHEMA)
        updates = {c: f"s.{c}" for c in update_columns}

        def attempt(dt: DeltaTable) -> bool:
            (
                dt.merge(
                    rows,
                    predicate="t.id = s.id",
                    source_alias="s",
                    target_alias="t",
                    commit_properties=self._commit(meta),
                )
                .when_matched_update(updates=updates)
                .when_not_matched_insert_all()
                .execute()
            )
            return True

        version = self._merge_retrying(attempt)
        assert version is not None  # attempt() always writes
        return version

    def _merge_retrying(self, attempt: Callable[[DeltaTable], bool]) -> int | None:
        """Run ``attempt`` on a fresh snapshot until its merge commits; a concurrent writer's commit
        (``CommitFailedError``) means re-reading the table and merging again, at most MERGE_ATTEMPTS times.

        Returns:
            The committed version, or None when ``attempt`` found nothing to write.
        """
        for i in range(MERGE_ATTEMPTS):
            dt = self.table()
            try:
                if not attempt(dt):
                    return None
            except CommitFailedError as exc:
                if i + 1 == MERGE_ATTEMPTS:
                    raise self._contention_error(exc) from exc
                continue
            return dt.version()
        raise AssertionError("unreachable")

    def _contention_error(self, exc: Exception) -> StoreError:
        return StoreError(
            f"store {self.uri} kept changing under this write ({MERGE_ATTEMPTS} attempts, each beaten by "
            f"another writer's commit); nothing was written. Re-run the command: rows that the other "
            f"writers added are skipped, not duplicated. ({exc})"
        )


def empty_rows() -> dict[str, list[Any]]:
    """A column-oriented buffer for building rows that match :data:`SCHEMA`."""
    return {name: [] for name in SCHEMA.names}


def to_arrow(rows: dict[str, list[Any]]) -> pa.Table:
    """Build an Arrow table with the store schema from a column buffer (missing columns are null)."""
    n = len(rows["id"])
    arrays = {
        name: pa.array(rows.get(name) or [None] * n, type=SCHEMA.field(name).type) for name in SCHEMA.names
    }
    return pa.table(arrays, schema=SCHEMA)


def images_from(table: pa.Table) -> np.ndarray:
    """Decode the ``pixels`` column into a uint8 array of shape (N, H, W)."""
    if table.num_rows == 0:
        return np.zeros((0, 64, 64), dtype=np.uint8)
    h = int(table.column("height")[0].as_py())
    w = int(table.column("width")[0].as_py())
    buf = b"".join(table.column("pixels").to_pylist())
    return np.frombuffer(buf, dtype=np.uint8).reshape(-1, h, w).copy()
