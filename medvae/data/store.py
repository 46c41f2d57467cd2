"""The versioned dataset: a Delta Lake table of 64×64 images with lineage in every commit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from medvae import __version__
from medvae.errors import StoreError

try:
    import fcntl
except ImportError:  # not on Windows: failed writes there keep their orphan files
    fcntl = None  # type: ignore[assignment]


def _arrow_without_pandas() -> None:
    """Let pyarrow build arrays without importing pandas.

    The first ``pa.array`` of a process imports pandas (pyarrow checks whether its input is a pandas
    object), which costs more CPU than everything else a small ingest does at start-up (2.3 s of CPU
    time measured on the 2-core reference machine); medvae never hands pyarrow pandas objects. pyarrow
    tries that import once: made to fail here, with pandas hidden only for that one call, it records "no
    pandas" for its type checks. Anything that really asks pyarrow for pandas (``to_pandas()``) still
    gets it, as pyarrow then imports pandas for real.
    """
    import sys
    from importlib.abc import MetaPathFinder

    if "pandas" in sys.modules:
        return

    class _HidePandas(MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name == "pandas" or name.startswith("pandas."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    hide = _HidePandas()
    sys.meta_path.insert(0, hide)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hide)


_arrow_without_pandas()

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
# On an object store the key is the one row of a small Delta table beside the dataset: a put there cannot
# refuse to overwrite, but a Delta commit can (see Store._remote_key).
KEY_TABLE = "key"
WRITE_LOCK = "write.lock"  # held shared by every writer, exclusively by a failed write's cleanup
# A merge reads the whole table, so delta-rs refuses to commit it over a concurrent append (another
# ingest): the merge must be re-run on the new snapshot. Bounded, so a store under constant write
# contention ends in a clear error instead of spinning.
MERGE_ATTEMPTS = 8


def is_local(uri: str) -> bool:
    """True when ``uri`` names a local path rather than an object-store URI."""
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def is_s3(uri: str) -> bool:
    """True for ``s3://`` and ``s3a://`` URIs (AWS S3 or an S3-compatible endpoint)."""
    return uri.lower().startswith(("s3://", "s3a://"))


# Terminal escape sequences that delta-rs and object_store put in their messages (coloured "↳" chains):
# CSI (``ESC [ ... final``), OSC (``ESC ] ... BEL`` or ``ESC ] ... ESC \\``) and two-byte escapes.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BACKTRACE = re.compile(r"^\s*(\d+: |at \S+:\d+(:\d+)?$|stack backtrace:)", re.IGNORECASE)
# How a full disk (or an exceeded quota) shows in delta-rs messages, which carry no errno.
_DISK_FULL = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def brief(exc: BaseException | str, limit: int = 400) -> str:
    """A delta-rs/object_store error on one plain line: no escape sequences, no control characters.

    They come as coloured, indented multi-line chains; every delta-rs message medvae re-raises goes
    through here, so a terminal never receives raw escapes.
    """
    lines = _ESCAPES.sub("", str(exc)).splitlines()
    # With RUST_BACKTRACE set, delta-rs appends a backtrace: "  0: <unknown>", "     at file.rs:1:2".
    kept = [ln for ln in lines if not _BACKTRACE.match(ln)]
    text = " ".join(_CONTROL.sub(" ", " ".join(kept)).replace("↳", " ").split())
    return text[:limit] + ("…" if len(text) > limit else "")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or an exceeded quota, however delta-rs or the OS reported it."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return any(marker in str(exc).lower() for marker in _DISK_FULL)


def _s3_setting(storage_options: Mapping[str, str] | None, *names: str) -> tuple[str, str] | None:
    """The first of ``names`` (case-insensitive) set in ``storage_options`` or else in the environment,
    as ``(the name as it was written, value)``; explicit options win, as they do in delta-rs.

    delta-rs reads the environment itself; medvae looks only to check, before it writes anything, the
    settings that decide whether commits are safe.
    """
    wanted = {n.upper() for n in names}
    for source in (storage_options or {}, os.environ):
        for k, v in source.items():
            if k.upper() in wanted and str(v).strip():
                return k, str(v).strip()
    return None


def check_safe_commits(uri: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Refuse settings under which commits to an S3 store would not be safe against concurrent writers.

    deltalake 1.x commits every version to S3 as a conditional PUT (``If-None-Match: *``) of the next
    ``_delta_log`` entry, so two writers can never both create the same version. That needs no
    configuration, but two settings break the guarantee or the belief in it:

    * ``conditional_put=disabled`` turns conditional PUTs off; delta-rs then fails every commit with an
      obscure "not yet implemented" error.
    * ``AWS_S3_LOCKING_PROVIDER`` (the DynamoDB lock of deltalake < 1.0) is silently ignored by deltalake
      1.x. Someone who set it relies on a lock that no longer exists, perhaps against an endpoint that
      ignores ``If-None-Match``; writing anyway would risk a corrupt log.

    Raises:
        StoreError: naming the setting and what to do instead.
    """
    if not is_s3(uri):
        return
    found = _s3_setting(storage_options, "AWS_CONDITIONAL_PUT", "CONDITIONAL_PUT")
    if found is not None and found[1].lower() == "disabled":
        raise StoreError(
            f"store {uri}: {found[0]}=disabled turns off the conditional PUT that keeps concurrent commits "
            f"from overwriting each other; deltalake cannot commit to S3 without it. Remove {found[0]} "
            "(see docs/object_storage.md)."
        )
    found = _s3_setting(storage_options, "AWS_S3_LOCKING_PROVIDER")
    if found is not None:
        raise StoreError(
            f"store {uri}: {found[0]}={found[1]} is set, but deltalake {deltalake.__version__} "
            "no longer supports a locking provider and ignores it. Commits are protected by S3 conditional "
            "writes (PUT with If-None-Match: *) instead, which AWS S3 supports (as do MinIO and Cloudflare "
            "R2, per the delta-rs docs). Check that your endpoint does, then unset AWS_S3_LOCKING_PROVIDER "
            "and DELTA_DYNAMO_TABLE_NAME (see docs/object_storage.md). medvae will not write while it is "
            "set: a store that relied on the lock would be written without one."
        )


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
    from medvae.data.deid import redact_config

    return {
        "operation": operation,
        "config": redact_config(config),
        "medvae_version": __version__,
        "git_commit": git_commit(),
        **extra,
    }


# A data file, or one still being written: delta-rs's local object store writes ``<name>.parquet#<n>``
# and renames it into place, so a concurrent first ingest can be caught with only the staging file.
_DATA_FILE = re.compile(r"[^/]+\.parquet(#\d+)?")


def _location_problem(root: Path, writing: bool) -> str | None:
    """What makes a local path unusable as a store, in words, or None.

    A store is a folder with a ``_delta_log``. A folder that does not exist yet, is empty or holds only
    medvae's ``_medvae`` (the key is written before the first version) is a store still to be created:
    fine to write, "no store yet" to read. Each path is looked at once (one ``stat``), so a store that a
    concurrent writer creates meanwhile is seen either as absent or as a store, never half-way.
    """
    kind = _kind(root)
    if kind == "missing":
        return None if writing else _no_store(str(root))
    if kind == "under a file":
        return f"cannot use {root} as a store: a folder on its path is a file"
    if kind != "folder":
        return f"{root} is {kind}, not a medvae store"
    log = _kind(root / "_delta_log")
    if log == "folder":
        return None
    if log != "missing":
        return f"store {root}: its _delta_log is {log}, not a folder; this is not a medvae store"
    try:
        entries = os.listdir(root)
    except OSError as exc:
        return f"cannot list store folder {root}: {exc.strerror or exc}"
    foreign = [e for e in entries if e not in (KEY_DIR, "_delta_log")]
    # A medvae writer creating the store writes its key, then the data files, then the _delta_log.
    creating = KEY_DIR in entries and all(_DATA_FILE.fullmatch(e) for e in foreign)
    if foreign and not creating:
        return (
            f"{root} exists but is not a medvae store (no _delta_log): it holds {len(foreign)} other "
            "entries; point --store at a medvae store, or at a new or empty folder to create one"
        )
    return None if writing else _no_store(str(root))


def _kind(path: Path) -> str:
    """``folder``, ``missing``, ``under a file`` or what else ``path`` is, from one ``stat``."""
    import stat as st

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "under a file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if st.S_ISDIR(mode):
        return "folder"
    return "a file" if st.S_ISREG(mode) else "not a folder"


def _no_store(uri: str) -> str:
    return f"no medvae store at {uri}: run `medvae ingest SOURCE --store {uri}` first"


@dataclass(frozen=True)
class VersionInfo:
    """One version of the store, as listed by ``medvae versions``."""

    version: int
    timestamp: int | None
    operation: str
    rows: int
    lineage: dict[str, Any]


class Store:
    """A medvae dataset: a Delta table at a local path or an object-store URI that deltalake accepts.

    On S3 (``s3://bucket/prefix``) the credentials, region and endpoint come from the standard ``AWS_*``
    environment variables, which delta-rs reads itself, and/or from ``storage_options`` (which win).
    See docs/object_storage.md.

    Args:
        uri: local path or object-store URI (``s3://bucket/prefix`` ...).
        storage_options: passed to deltalake for object stores (credentials, endpoint).
    """

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, str] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = storage_options
        self._key: bytes | None = None  # an object store's key, once read: it never changes

    # ---------------------------------------------------------------- key
    def key(self, create: bool = True) -> bytes:
        """The store's secret HMAC key, created on first use.

        The key lives beside the table and belongs to the store: whoever may read the store may recognise
        re-ingested content, but a hash cannot be reversed without it. On a local disk it is
        ``_medvae/store.key`` (mode 0600); on an object store see :meth:`_remote_key`.

        Raises:
            StoreError: when ``create`` is False and the store has no key, or the key cannot be created.
        """
        if not is_local(self.uri):
            if self._key is None:
                self._key = self._remote_key(create)
            return self._key
        self._check_location(writing=True)  # a store still to be created has its key before its table
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
        """The key of a store on an object store, created race-free on first use.

        An object-store PUT cannot be made to fail when the object exists through any client medvae has
        (pyarrow's and delta-rs's file systems both overwrite), so two first ingests racing to write
        ``_medvae/store.key`` would each keep the key they wrote, silently hashing the same scans to
        different ids. Instead the key is the single row of a tiny Delta table, ``_medvae/key``, created
        with ``mode="error"`` and no commit retries: its version 0 is a conditional create, exactly like a
        dataset commit, so one writer wins and every other writer reads the winner's key. It goes through
        delta-rs, so it uses the same endpoint, credentials and settings as the dataset itself.

        A ``_medvae/store.key`` file, when present (a store copied from a local disk, or written by an
        earlier medvae), is the key whose hashes are already in the table, so it takes precedence.
        """
        legacy = self._read_remote_file(f"{KEY_DIR}/{KEY_FILE}")
        if legacy is not None:
            return bytes.fromhex(legacy.decode().strip())
        found = self._read_key_table()
        if found is not None:
            return found
        if not create:
            raise StoreError(f"store {self.uri} has no key; was it created by medvae?")
        check_safe_commits(self.uri, self.storage_options)
        try:
            write_deltalake(
                self._key_table_uri(),
                pa.table({"key": [secrets.token_bytes(32).hex()]}),
                mode="error",
                storage_options=self.storage_options,
                # No retries: a retried create would append a second key beside the winner's.
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except Exception as exc:  # another writer created the key first: use theirs
            found = self._read_key_table()
            if found is None:
                raise StoreError(f"cannot create the key of store {self.uri}: {brief(exc)}") from exc
            return found
        # Read back rather than trust the candidate: what is committed is what every writer will use.
        found = self._read_key_table()
        if found is None:
            raise StoreError(f"the key of store {self.uri} was written but cannot be read back")
        return found

    def _key_table_uri(self) -> str:
        return f"{self.uri.rstrip('/')}/{KEY_DIR}/{KEY_TABLE}"

    def _read_key_table(self) -> bytes | None:
        try:
            dt = DeltaTable(self._key_table_uri(), storage_options=self.storage_options)
        except TableNotFoundError:
            return None
        except OSError as exc:
            raise self._unreachable(exc) from exc
        keys = set(dt.to_pyarrow_table(columns=["key"]).column("key").to_pylist())
        if len(keys) != 1:
            raise StoreError(f"store {self.uri}: {self._key_table_uri()} holds {len(keys)} keys, not one")
        return bytes.fromhex(str(keys.pop()).strip())

    def _read_remote_file(self, rel: str) -> bytes | None:
        """A file under the store's URI read through delta-rs's object store (same endpoint, credentials
        and options as the table), or None when it does not exist."""
        from deltalake.fs import DeltaStorageHandler
        from pyarrow import fs as pafs

        try:
            filesystem = pafs.PyFileSystem(DeltaStorageHandler(self.uri, options=self.storage_options))
            if filesystem.get_file_info(rel).type != pafs.FileType.File:
                return None
            with filesystem.open_input_stream(rel) as inp:
                return bytes(inp.read())
        except OSError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> StoreError:
        hint = (
            " Check the bucket name, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN), the region (AWS_REGION) and, for MinIO or another S3-compatible server, "
            "AWS_ENDPOINT_URL (plus AWS_ALLOW_HTTP=true for a plain http:// endpoint)."
            if is_s3(self.uri)
            else ""
        )
        return StoreError(f"cannot reach store {self.uri}: {brief(exc)}.{hint}")

    # ---------------------------------------------------------------- read
    def _check_location(self, writing: bool) -> None:
        """Refuse a local path that is a file, or a folder that holds something other than a store.

        Raises:
            StoreError: naming the path and what is wrong with it (reading: also when there is no store).
        """
        if is_local(self.uri):
            problem = _location_problem(_local_path(self.uri), writing)
            if problem is not None:
                raise StoreError(problem)

    def exists(self) -> bool:
        """Whether a Delta table exists at the URI.

        Raises:
            StoreError: when the path is a file or a folder that is not a store, or an object store
                cannot be reached (no such bucket, bad credentials...).
        """
        if is_local(self.uri):
            self._check_location(writing=True)  # a path where a store could be created, or one
        try:
            return bool(DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options))
        except OSError as exc:
            if is_local(self.uri):
                raise StoreError(f"cannot read store {self.uri}: {brief(exc)}") from exc
            raise self._unreachable(exc) from exc

    def table(self, version: int | None = None) -> DeltaTable:
        """The Delta table, at ``version`` or the latest.

        Raises:
            StoreError: when there is no table or no such version, or the path is not a store.
        """
        self._check_location(writing=False)
        try:
            dt = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError as exc:
            raise StoreError(_no_store(self.uri)) from exc
        except OSError as exc:
            if is_local(self.uri):
                raise StoreError(f"cannot read store {self.uri}: {brief(exc)}") from exc
            raise self._unreachable(exc) from exc
        except Exception as exc:  # delta-rs's DeltaError: a log it cannot read
            raise StoreError(f"cannot open store {self.uri}: {brief(exc)}") from exc
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
        where: Mapping[str, str | list[str]] | None = None,
    ) -> pa.Table:
        """Rows of a version as an Arrow table, optionally projected and filtered.

        Args:
            version: the version to read, latest when None.
            columns: the columns to return, all when None.
            where: filters such as ``{"label": "normal", "origin": "real"}``; a list of values keeps rows
                whose column equals any of them (``{"origin": ["real", "synthetic"]}``).
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
            col = pc.cast(table.column(key), pa.string())
            allowed = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            table = table.filter(pc.is_in(col, value_set=pa.array(allowed, pa.string())))
        return table.select(cols) if cols is not None else table

    def ids(self, column: str = "source_id") -> set[str]:
        """The distinct non-null values of one id column in the latest version (empty for a new store)."""
        return {v for v in self.column(column).to_pylist() if v is not None}

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of the latest version as Arrow (empty for a new store), without Python objects."""
        if not self.exists():
            return pa.chunked_array([], type=SCHEMA.field(name).type)
        return self.table().to_pyarrow_table(columns=[name]).column(name)

    def _commits(self, dt: DeltaTable | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every commit up to ``dt``'s version (the latest when None), oldest first, as (delta-rs commit
        info, medvae lineage); one read of the log."""
        out = []
        dt = dt if dt is not None else self.table()
        for entry in sorted(dt.history(), key=lambda e: int(e.get("version", 0))):
            raw = entry.get("medvae")
            out.append((entry, json.loads(raw) if isinstance(raw, str) else {}))
        return out

    def history(self) -> list[VersionInfo]:
        """Every version, oldest first, with its row count, operation and lineage."""
        out: list[VersionInfo] = []
        at = self.table()
        for entry, meta in self._commits(at):
            v = int(entry.get("version", 0))
            # Row counts need each version's snapshot. One table object walks forward through the
            # versions rather than opening one per version: on an object store every open lists the log.
            at.load_as_version(v)
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

    def insert_new(self, rows: pa.Table, meta: Meta) -> Committed | None:
        """Commit ``rows`` whose ``id`` is not yet in the store, as exactly one new version.

        A merge on ``id`` (insert when not matched) makes de-duplication part of the atomic commit, so two
        writers ingesting the same file cannot both add it. The rows are filtered against the snapshot
        that the merge commits on top of, so the result says what this call really added, not what the
        caller hoped to add: a concurrent writer may have committed some or all of them first.

        Args:
            rows: rows in (or castable to) :data:`SCHEMA`.
            meta: the lineage of the version, or a function of the ids this version really adds that
                returns it (called again if a concurrent commit forces the merge to be re-run). A dict
                with ``rows_added`` is corrected when fewer rows are new (``rows_already_present``).

        Returns:
            The new version with the ids it added, or None when every row was already in the store.

        Raises:
            StoreError: when the store cannot be written (the message is one plain line; a full disk
                says so, and files of the failed commit are removed).
        """
        if rows.num_rows == 0:
            return None
        check_safe_commits(self.uri, self.storage_options)
        rows = rows.cast(SCHEMA)
        if not self.exists():
            created = self._create(rows, meta)
            if created is not None:
                return created

        def attempt(dt: DeltaTable) -> frozenset[str] | None:
            # Keep only ids absent from the snapshot the merge runs against; a conflicting commit re-runs
            # this on the newer snapshot. Nothing new means no empty version.
            present = pa.array(dt.to_pyarrow_table(columns=["id"]).column("id").to_pylist(), pa.string())
            new = rows.filter(pc.invert(pc.is_in(rows.column("id"), value_set=present)))
            if new.num_rows == 0:
                return None
            ids = frozenset(new.column("id").to_pylist())
            self._merge_on_id(
                dt, new, _resolve_meta(meta, ids, rows.num_rows)
            ).when_not_matched_insert_all().execute()
            return ids

        return self._merge_retrying(attempt)

    def _create(self, rows: pa.Table, meta: Meta) -> Committed | None:
        """Create the table with ``rows`` as version 0; None when another writer created it first."""
        self.key()  # the key must exist before the first version that depends on it
        ids = frozenset(rows.column("id").to_pylist())
        try:
            with self._write_guard():
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
                    commit_properties=self._commit(_resolve_meta(meta, ids, rows.num_rows), retries=0),
                )
        except Exception as exc:
            if self.exists():
                return None  # another writer created the table first: the caller merges instead
            raise self._write_error("cannot create store", exc) from exc
        return Committed(0, ids)  # without retries, a successful create is version 0

    def upsert(self, rows: pa.Table, meta: dict[str, Any], update_columns: Iterable[str]) -> int:
        """One atomic version that updates ``update_columns`` of matching ids and inserts the rest.

        The pipeline uses it to write synthetic rows and the real rows' anomaly scores together.

        Returns:
            The new version.
        """
        check_safe_commits(self.uri, self.storage_options)
        rows = rows.cast(SCHEMA)
        updates = {c: f"s.{c}" for c in update_columns}

        def attempt(dt: DeltaTable) -> frozenset[str]:
            merge = self._merge_on_id(dt, rows, meta)
            merge.when_matched_update(updates=updates).when_not_matched_insert_all().execute()
            return frozenset(rows.column("id").to_pylist())

        committed = self._merge_retrying(attempt)
        assert committed is not None  # attempt() always writes
        return int(committed)

    def _merge_on_id(self, dt: DeltaTable, rows: pa.Table, meta: dict[str, Any]) -> Any:
        """A merge of ``rows`` (source ``s``) into ``dt`` (target ``t``) on ``id``, committing ``meta``."""
        return dt.merge(
            rows,
            predicate="t.id = s.id",
            source_alias="s",
            target_alias="t",
            commit_properties=self._commit(meta),
        )

    def _merge_retrying(self, attempt: Callable[[DeltaTable], frozenset[str] | None]) -> Committed | None:
        """Run ``attempt`` on a fresh snapshot until its merge commits; a concurrent writer's commit
        (``CommitFailedError``) means re-reading the table and merging again, at most MERGE_ATTEMPTS times.

        Returns:
            The committed version with the ids ``attempt`` wrote, or None when it found nothing to write.
        """
        for i in range(MERGE_ATTEMPTS):
            dt = self.table()
            try:
                with self._write_guard():
                    ids = attempt(dt)
            except CommitFailedError as exc:
                if i + 1 == MERGE_ATTEMPTS:
                    raise self._contention_error(exc) from exc
                continue
            except Exception as exc:
                raise self._write_error("cannot write to store", exc) from exc
            return None if ids is None else Committed(dt.version(), ids)
        raise AssertionError("unreachable")

    def _write_error(self, what: str, exc: Exception) -> StoreError:
        """A failed write as one plain line that says the store is unchanged."""
        if isinstance(exc, StoreError):
            return exc
        if is_disk_full(exc):
            return StoreError(
                f"the disk is full (no space left on device) while writing store {self.uri}: nothing was "
                "committed and the store is as it was; free some disk space or move the store, then run "
                f"the command again ({brief(exc, 200)})"
            )
        return StoreError(f"{what} {self.uri}: {brief(exc)}")

    @contextlib.contextmanager
    def _write_guard(self) -> Iterator[None]:
        """Around one delta-rs write: if it fails, delete the data files it wrote that no version uses.

        delta-rs writes the parquet files first and the ``_delta_log`` entry last, so a write that fails
        in between (a full disk) leaves the store at its prior version, right, but with an orphan data
        file. "Written by this call" is the data files that appeared during the call; to be sure no
        other writer's uncommitted files are among them, every medvae writer holds a shared lock on
        ``_medvae/write.lock`` while it writes, and the cleanup runs only if it can take that lock
        exclusively (otherwise the orphans stay; they are harmless and ``vacuum`` removes them). Files
        referenced by any version committed meanwhile are never touched. Local stores only: on object
        storage a failed PUT leaves no object.
        """
        if not is_local(self.uri) or fcntl is None:
            yield
            return
        root = _local_path(self.uri)
        (root / KEY_DIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(root / KEY_DIR / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            before, log_before = _data_files(root), _log_entries(root)
            try:
                yield
            except BaseException:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while another writer writes
                    referenced = _referenced_since(root, log_before)
                    for rel in _data_files(root) - before - referenced:
                        (root / rel).unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)

    def _contention_error(self, exc: Exception) -> StoreError:
        return StoreError(
            f"store {self.uri} kept changing under this write ({MERGE_ATTEMPTS} attempts, each beaten by "
            f"another writer's commit); nothing was written. Re-run the command: rows that the other "
            f"writers added are skipped, not duplicated. ({brief(exc, 200)})"
        )


class Committed(int):
    """What one write committed: the version number (it *is* that int), and the ids it really added.

    An ``int`` so that callers that only want the version use it as one (``== 3``, JSON, ``%d``).
    """

    ids: frozenset[str]

    def __new__(cls, version: int, ids: Iterable[str] = ()) -> Committed:
        obj = super().__new__(cls, version)
        obj.ids = frozenset(ids)
        return obj

    def __getnewargs__(self) -> tuple[int, frozenset[str]]:  # type: ignore[override]
        return int(self), self.ids

    @property
    def version(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"Committed(version={int(self)}, ids={len(self.ids)})"

    def __str__(self) -> str:
        # int's str() falls back to repr(): without this, "version {v}" printed the repr to users.
        return str(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)


Meta = dict[str, Any] | Callable[[frozenset[str]], dict[str, Any]]


def _resolve_meta(meta: Meta, ids: frozenset[str], offered: int) -> dict[str, Any]:
    """The lineage of a version that adds ``ids`` out of ``offered`` rows (see :meth:`Store.insert_new`)."""
    if callable(meta):
        return meta(ids)
    m = dict(meta)
    if "rows_added" in m and m["rows_added"] != len(ids):
        m["rows_added"] = len(ids)
        m["rows_already_present"] = offered - len(ids)
    return m


def _data_files(root: Path) -> set[str]:
    """Every parquet data file of a local table, relative to it (medvae's and delta's folders excluded)."""
    out: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        rel = os.path.relpath(folder, root)
        out.update(os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".parquet"))
    return out


def _log_entries(root: Path) -> set[str]:
    log = root / "_delta_log"
    return {f for f in os.listdir(log) if f.endswith(".json")} if log.is_dir() else set()


def _referenced_since(root: Path, log_before: set[str]) -> set[str]:
    """The data files added by the log entries that are not in ``log_before`` (committed meanwhile)."""
    from urllib.parse import unquote

    out: set[str] = set()
    for entry in sorted(_log_entries(root) - log_before):
        with open(root / "_delta_log" / entry, encoding="utf-8") as fh:
            for line in fh:
                action = json.loads(line) if line.strip() else {}
                if "add" in action:
                    out.add(os.path.normpath(unquote(action["add"]["path"])))
    return out


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
