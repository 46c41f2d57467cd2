"""Ingest folders of scans: walk, decode in parallel, de-identify, de-duplicate, commit one version."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvae.config import IngestConfig, to_jsonable
from medvae.data.deid import allowed_meta, keyed_hash, patient_from_name, split_for
from medvae.data.prepare import stored_image
from medvae.data.staging import read_bytes, remove_tree, write_bytes
from medvae.data.walk import iter_files, label_for, read_labels_csv

if TYPE_CHECKING:  # the store pulls in deltalake and pyarrow, which spawned decoder workers never need
    import pyarrow as pa

    from medvae.data.store import Store

INGESTED, REJECTED, SKIPPED = "ingested", "rejected", "skipped"


@dataclass
class FileResult:
    """What happened to one input file: its status, and the reason when it was rejected or skipped."""

    path: str
    status: str
    reason: str | None = None
    ids: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class IngestReport:
    """The full account of one ingest: every file seen, with its status."""

    files: list[FileResult]
    version: int | None
    store: str

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(f.status for f in self.files)
        return {"seen": len(self.files), INGESTED: c[INGESTED], REJECTED: c[REJECTED], SKIPPED: c[SKIPPED]}

    @property
    def rows_added(self) -> int:
        return sum(len(f.ids) for f in self.files if f.status == INGESTED)

    def summary_line(self) -> str:
        c = self.counts
        return f"ingested {c[INGESTED]}, rejected {c[REJECTED]}, skipped {c[SKIPPED]}"

    def to_json(self) -> dict[str, Any]:
        """The report as written by ``--report``: counts, the version, and one entry per input file."""
        return {
            "store": self.store,
            "version": self.version,
            "counts": self.counts,
            "rows_added": self.rows_added,
            "files": [
                {"path": f.path, "status": f.status, "reason": f.reason, "ids": f.ids} for f in self.files
            ],
        }

    def write(self, path: Path) -> None:
        """Write the JSON report atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class DecodeContext:
    """What decoding one file needs besides the file: the store's key, the ids it holds, the config.

    ``known`` is anything with ``in``: a frozenset in the embedded path, a :class:`KnownIds` array when
    batches run on a task runner (compact enough to ship to every worker of a large archive).
    """

    key: bytes
    known: Any
    cfg: IngestConfig


_W: dict[str, Any] = {}


def _init_worker(key: bytes, known: frozenset[str], cfg_json: str, pool_worker: bool = True) -> None:
    # Runs once per worker process: the config, key and known ids are shipped once, not per file.
    if pool_worker:
        # Parallelism comes from processes, one per core; multi-threaded BLAS inside each would
        # oversubscribe the cores, and spinning BLAS threads then make a 0.2 ms resize take 10 ms.
        from threadpoolctl import threadpool_limits

        _W["limits"] = threadpool_limits(1)
    _W["ctx"] = DecodeContext(key, known, IngestConfig.model_validate_json(cfg_json))


def _process_in_worker(job: tuple[str, str | None]) -> FileResult:
    """:func:`decode_one` with the context that :func:`_init_worker` installed in this process."""
    return decode_one(job, _W["ctx"])


def decode_one(job: tuple[str, str | None], ctx: DecodeContext) -> FileResult:
    """Decode one file into store rows, or say why not. Never raises: every file gets a result.

    Args:
        job: the file's path and its label (None when unlabelled).
        ctx: the store key, the source ids already stored, and the ingest config.

    Returns:
        The file's result; its rows hold the pixels when it was ingested.
    """
    from medvae.data.labels import vet_label
    from medvae.data.readers import RejectedInput, decode_bytes

    path_s, label = job
    cfg, key = ctx.cfg, ctx.key
    path = Path(path_s)
    if label is not None and not _is_utf8(label):
        # A folder name in a legacy encoding (e.g. Latin-1 bytes) reaches Python as surrogate escapes,
        # which the store's UTF-8 string column refuses: at commit time, failing the whole ingest. The
        # name itself stays out of the reason, as reasons are tallied into the store's lineage.
        return FileResult(
            path_s,
            REJECTED,
            "label folder name is not valid UTF-8: labels are stored as text; rename the folder "
            "(e.g. with convmv) or give labels in labels_csv",
        )
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return FileResult(path_s, REJECTED, f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > cfg.max_file_bytes:
            return FileResult(
                path_s,
                REJECTED,
                f"file is {st.st_size} bytes, over max_file_bytes={cfg.max_file_bytes}; not read "
                "(raise max_file_bytes to ingest it)",
            )
        data = path.read_bytes()
    except OSError as exc:
        return FileResult(path_s, REJECTED, f"cannot read file: {exc.strerror or exc}")
    source_id = keyed_hash(key, "source", data)
    if source_id in ctx.known:
        return FileResult(path_s, SKIPPED, "already in the store (same content)", ids=[])
    try:
        images = decode_bytes(data, path.name, cfg)
    except RejectedInput as exc:
        return FileResult(path_s, REJECTED, exc.reason)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        # A decoder bug must not stop the batch; the file is rejected with the cause. BaseException, not
        # Exception: a panicking Rust codec raises pyo3's PanicException, which derives from it.
        return FileResult(path_s, REJECTED, f"unexpected decoder error {type(exc).__name__}: {exc}")
    # DICOM folder names and labels that name the patient are withheld; the file is still ingested.
    label, label_note = vet_label(label, images, cfg)

    rows: list[dict[str, Any]] = []
    for img in images:
        try:
            pix = stored_image(img.pixels, cfg)
        except Exception as exc:
            return FileResult(path_s, REJECTED, f"cannot normalise image: {type(exc).__name__}: {exc}")
        patient = img.patient_ref or patient_from_name(path.name, cfg.patient_regex)
        # surrogatepass: a patient ID cut from a non-UTF-8 file name holds surrogate escapes, which plain
        # encode() refuses (an exception outside any handler); this encoding is still one-to-one.
        patient_key = (
            keyed_hash(key, "patient", patient.encode("utf-8", "surrogatepass"))[:32] if patient else None
        )
        meta = allowed_meta(img.meta)
        spacing = meta.pop("pixel_spacing") or [None, None]
        row_id = source_id[:32] if len(images) == 1 else f"{source_id[:32]}-f{img.frame_index}"
        rows.append(
            {
                **meta,
                "id": row_id,
                "source_id": source_id,
                "patient_key": patient_key,
                "frame": img.frame_index,
                "n_frames": img.n_frames,
                "height": cfg.size,
                "width": cfg.size,
                "pixels": pix.tobytes(),
                "label": label,
                "split": split_for(key, patient_key or source_id, cfg.split_fractions),
                "origin": "real",
                "pixel_spacing_row": spacing[0],
                "pixel_spacing_col": spacing[1],
            }
        )
    return FileResult(path_s, INGESTED, label_note, ids=[r["id"] for r in rows], rows=rows)


def _is_utf8(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (file names in other encodings carry surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for a rejection reason."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "an unknown kind of file"


@dataclass
class IngestPlan:
    """The walked input of one ingest, before any file is decoded.

    Attributes:
        results: one slot per walked file, in walk order; files the walk itself rejected are filled in.
        jobs: ``(slot, (path, label))`` for every file still to decode.
        key: the store's HMAC key (never leaves the machine that plans and the workers that decode).
        known: source ids already in the store; their files are skipped without decoding.
    """

    results: list[FileResult | None]
    jobs: list[tuple[int, tuple[str, str | None]]]
    key: bytes
    known: frozenset[str]


def plan_ingest(sources: Sequence[Path], store: Store, cfg: IngestConfig) -> IngestPlan:
    """Walk ``sources``, check the store's image settings, and list the files to decode.

    Creates the store's key on first use, so that workers elsewhere can read it.

    Raises:
        StoreError: when the store holds images made with other image settings, or cannot be read.
    """
    from medvae.data.store import StoreError, image_settings_of

    csv_labels = read_labels_csv(cfg.labels_csv) if cfg.labels_csv else None
    walked = list(iter_files(sources))
    results: list[FileResult | None] = [None] * len(walked)
    jobs: list[tuple[int, tuple[str, str | None]]] = []
    for i, (path, walk_error) in enumerate(walked):
        if walk_error is not None:
            results[i] = FileResult(str(path), REJECTED, walk_error)
        else:
            jobs.append((i, (str(path), label_for(path, cfg, csv_labels))))

    if store.exists():
        # One store holds one kind of image: refuse to mix, say, CLAHE-standardised and raw pixels.
        prior, mine = store.image_settings(), image_settings_of(to_jsonable(cfg))
        if prior is not None and prior != mine:
            diff = ", ".join(f"{k}={prior[k]}" for k in prior if prior[k] != mine[k])
            raise StoreError(
                f"store {store.uri} holds images ingested with {diff}; ingest with the same settings "
                "(--set key=value) or into a new store"
            )
    return IngestPlan(results, jobs, store.key(), frozenset(store.ids("source_id")))


def ingest(
    sources: Sequence[Path],
    store: Store,
    cfg: IngestConfig,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    operation: str = "ingest",
) -> IngestReport:
    """Ingest every file under ``sources`` into ``store`` as exactly one new version.

    Files are decoded on every core. Content already in the store, or repeated within this batch, is
    skipped; files that cannot or must not be ingested are rejected with a reason. A broken file never
    stops the run. Nothing that identifies a patient, a date, an original UID or a source path is written.

    Args:
        sources: files and folders to ingest.
        store: the destination store (created on first ingest).
        cfg: the validated ingest config.
        on_progress: called as ``on_progress(done, total)`` while files are processed.
        operation: the operation name recorded in the version's lineage.

    Returns:
        The report; ``report.version`` is None when nothing new was committed.

    Raises:
        StoreError: when the store itself cannot be read or written.
    """
    plan = plan_ingest(sources, store, cfg)
    total = len(plan.results)
    done = total - len(plan.jobs)
    if on_progress:
        on_progress(done, total)
    init_args = (plan.key, plan.known, cfg.model_dump_json())
    for (i, _), res in zip(plan.jobs, _run_jobs([j for _, j in plan.jobs], cfg, init_args), strict=True):
        plan.results[i] = res
        done += 1
        if on_progress:
            on_progress(done, total)
    return commit_ingest([r for r in plan.results if r is not None], store, cfg, operation=operation)


def commit_ingest(
    results: list[FileResult],
    store: Store,
    cfg: IngestConfig,
    *,
    operation: str = "ingest",
    extra_rows: Iterable[pa.Table] = (),
) -> IngestReport:
    """Commit decoded files as exactly one new version; the last step of every ingest.

    Content repeated inside the batch is skipped here (the first file in walk order wins), so the
    outcome does not depend on how the files were split among workers.

    Args:
        results: every walked file's result, in walk order; ingested ones carry their rows, unless the
            rows come in ``extra_rows``.
        store: the destination store.
        cfg: the ingest config (recorded in the lineage).
        operation: the operation name recorded in the lineage.
        extra_rows: rows staged by batch workers (Arrow tables in the store schema), keyed by ``id``.

    Returns:
        The report, with the new version (None when nothing new was committed).
    """
    import pyarrow as pa

    from medvae.data.store import SCHEMA, StoreError, empty_rows, lineage, to_arrow

    seen_ids: set[str] = set()
    for r in results:
        if r.status != INGESTED:
            continue
        if any(i in seen_ids for i in r.ids):
            r.status, r.reason, r.rows = SKIPPED, "duplicate of another file in this batch (same content)", []
            r.ids = []
            continue
        seen_ids.update(r.ids)

    buf = empty_rows()
    for r in results:
        for row in r.rows:
            for k in buf:
                buf[k].append(row.get(k))
    rows = to_arrow(buf)
    staged = [t.cast(SCHEMA) for t in extra_rows]
    if staged:
        # Keep the ids of files still ingested after de-duplication, in walk order, one row each.
        order = {i: n for n, i in enumerate(i for r in results if r.status == INGESTED for i in r.ids)}
        all_staged = pa.concat_tables(staged)
        ids = all_staged.column("id").to_pylist()
        first: dict[str, int] = {}
        for n, i in enumerate(ids):
            if i in order and i not in first:
                first[i] = n
        picked = sorted(first, key=order.__getitem__)
        take = pa.array([first[i] for i in picked], type=pa.int64())
        rows = pa.concat_tables([rows, all_staged.take(take)])
    report = IngestReport(results, None, store.uri)
    reasons = Counter((r.reason or "").split(":")[0] for r in results if r.status == REJECTED)
    meta = lineage(
        operation,
        to_jsonable(cfg),
        counts=report.counts,
        rows_added=report.rows_added,
        rejected_reasons=dict(reasons),
    )
    try:
        report.version = store.insert_new(rows, meta)
    except Exception as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"cannot write to store {store.uri}: {exc}") from exc
    for r in results:
        r.rows = []  # pixels are in the store now; keep the report light
    return report


def _run_jobs(
    jobs: list[tuple[str, str | None]], cfg: IngestConfig, init_args: tuple[bytes, frozenset[str], str]
) -> Iterable[FileResult]:
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 32:
        # A pool costs ~1 s to start; small batches are faster in-process. The thread limit is scoped
        # so that whatever runs next in this process (training) keeps all its threads.
        from threadpoolctl import threadpool_limits

        ctx = DecodeContext(init_args[0], init_args[1], IngestConfig.model_validate_json(init_args[2]))
        with threadpool_limits(1):
            yield from (decode_one(j, ctx) for j in jobs)
        return
    # spawn, not fork: the parent may hold threads (Prefect, torch) that fork would copy mid-lock.
    ctx_mp = mp.get_context("spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(
        workers, mp_context=ctx_mp, initializer=_init_worker, initargs=init_args
    ) as pool:
        yield from pool.map(_process_in_worker, jobs, chunksize=chunk)


# ------------------------------------------------------------------- batches on a task runner
# The same plan -> decode -> commit as :func:`ingest`, split into steps that a Prefect task runner (a
# thread or process pool, or a Dask cluster) can run on other processes or machines. The steps hand over
# files in a staging folder beside the store (local or object storage), never pixels or the store key:
# task parameters and results end up in Prefect's database, and the key must not.
PLAN_FILE = "plan.json"


class KnownIds:
    """Source ids already in a store, as a sorted array of their 128-bit prefixes (16 bytes each).

    A frozenset of 64-character strings costs ~150 bytes per id: 1.5 GB in every worker for an archive of
    ten million scans. 16 bytes per id is 160 MB. The prefix is the same 128 bits that make a row's
    ``id``, so this is exactly as discriminating as the store itself.
    """

    def __init__(self, source_ids: Iterable[str] = (), *, array: np.ndarray | None = None) -> None:
        if array is None:
            array = np.array([bytes.fromhex(i[:32]) for i in source_ids], dtype="S16")
        self._a = np.unique(array)  # sorted, for binary search

    def __len__(self) -> int:
        return int(self._a.size)

    def __contains__(self, source_id: object) -> bool:
        if not isinstance(source_id, str) or not self._a.size:
            return False
        k = np.array(bytes.fromhex(source_id[:32]), dtype="S16")
        j = int(np.searchsorted(self._a, k))
        return j < self._a.size and bool(self._a[j] == k)

    def to_bytes(self) -> bytes:
        """The ``.npy`` serialisation (no pickle)."""
        import io

        buf = io.BytesIO()
        np.save(buf, self._a, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KnownIds:
        """Read what :meth:`to_bytes` wrote."""
        import io

        return cls(array=np.load(io.BytesIO(data), allow_pickle=False))


def prepare_batches(
    sources: Sequence[Path], store: Store, cfg: IngestConfig, staging: str, batch_files: int
) -> dict[str, Any]:
    """Plan an ingest and write its batches to ``staging``; the first step of a batched ingest.

    Args:
        sources: files and folders to ingest.
        store: the destination store (its key is created here if new).
        cfg: the ingest config.
        staging: the staging folder (see :func:`staging_uri`).
        batch_files: files per batch.

    Returns:
        ``{"staging", "batches", "files"}``: where the plan is, how many batches and files it has.
    """
    plan = plan_ingest(sources, store, cfg)
    # Workers elsewhere read the files by absolute path; the report keeps the paths as given.
    entries = [[slot, path, os.path.abspath(path), label] for slot, (path, label) in plan.jobs]
    batches = [entries[i : i + batch_files] for i in range(0, len(entries), batch_files)]
    walk = [
        {"slot": i, "path": r.path, "reason": r.reason} for i, r in enumerate(plan.results) if r is not None
    ]
    # A fresh name per plan: workers cache the known ids by name, and a staging folder may be reused.
    known = f"known-{os.urandom(8).hex()}.npy"
    write_bytes(f"{staging}/{known}", KnownIds(plan.known).to_bytes())
    for n, batch in enumerate(batches):
        write_bytes(f"{staging}/batch-{n:06d}.json", json.dumps({"known": known, "files": batch}).encode())
    write_bytes(
        f"{staging}/{PLAN_FILE}",
        json.dumps({"files": len(plan.results), "batches": len(batches), "walk_rejected": walk}).encode(),
    )
    return {"staging": staging, "batches": len(batches), "files": len(plan.results)}


def decode_batch(staging: str, index: int, store: Store, cfg: IngestConfig) -> dict[str, Any]:
    """Decode batch ``index`` of a staged plan and stage its rows and per-file results.

    Runs on any worker that can read the scans and the store. Re-running it (a retry) rewrites the same
    files. Never raises for a bad scan: each one is rejected with its reason.

    Returns:
        ``{"batch", "files", "ingested", "rejected", "skipped"}`` for this batch.
    """
    from threadpoolctl import threadpool_limits

    from medvae.data.store import empty_rows, to_arrow

    batch = json.loads(read_bytes(f"{staging}/batch-{index:06d}.json"))
    entries = batch["files"]
    ctx = DecodeContext(store.key(create=False), _known_ids(f"{staging}/{batch['known']}"), cfg)
    files: list[dict[str, Any]] = []
    buf = empty_rows()
    with threadpool_limits(1):  # one batch per worker core; see _init_worker
        for slot, shown, absolute, label in entries:
            res = decode_one((absolute, label), ctx)
            files.append(
                {"slot": slot, "path": shown, "status": res.status, "reason": res.reason, "ids": res.ids}
            )
            for row in res.rows:
                for k in buf:
                    buf[k].append(row.get(k))
    import pyarrow.parquet as pq
    from pyarrow import BufferOutputStream

    out = BufferOutputStream()
    pq.write_table(to_arrow(buf), out)
    write_bytes(f"{staging}/rows-{index:06d}.parquet", out.getvalue().to_pybytes())
    write_bytes(f"{staging}/files-{index:06d}.json", json.dumps(files).encode())
    c = Counter(f["status"] for f in files)
    return {
        "batch": index,
        "files": len(files),
        INGESTED: c[INGESTED],
        REJECTED: c[REJECTED],
        SKIPPED: c[SKIPPED],
    }


_KNOWN_CACHE: dict[str, KnownIds] = {}


def _known_ids(uri: str) -> KnownIds:
    # Every batch of a run on the same worker shares one copy of the known ids.
    if uri not in _KNOWN_CACHE:
        _KNOWN_CACHE.clear()
        _KNOWN_CACHE[uri] = KnownIds.from_bytes(read_bytes(uri))
    return _KNOWN_CACHE[uri]


def commit_batches(
    staging: str, store: Store, cfg: IngestConfig, *, operation: str = "ingest", cleanup: bool = True
) -> IngestReport:
    """Commit every decoded batch of a staged plan as exactly one new version, then remove the staging.

    The outcome is the same as :func:`ingest` over the same files: de-duplication within the run and
    the file order of the report follow the walk, not the order in which batches finished.

    Raises:
        StoreError: when a batch is missing (its task never finished) or the store cannot be written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medvae.data.store import StoreError

    plan = json.loads(read_bytes(f"{staging}/{PLAN_FILE}"))
    results: list[FileResult | None] = [None] * int(plan["files"])
    for w in plan["walk_rejected"]:
        results[w["slot"]] = FileResult(w["path"], REJECTED, w["reason"])
    staged: list[pa.Table] = []
    for n in range(int(plan["batches"])):
        try:
            files = json.loads(read_bytes(f"{staging}/files-{n:06d}.json"))
            staged.append(pq.read_table(pa.BufferReader(read_bytes(f"{staging}/rows-{n:06d}.parquet"))))
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(
                f"batch {n} of {staging} has no decoded output ({exc}); re-run the ingest"
            ) from exc
        for f in files:
            results[f["slot"]] = FileResult(f["path"], f["status"], f["reason"], ids=list(f["ids"]))
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise StoreError(f"{len(missing)} files of {staging} have no result; re-run the ingest")
    report = commit_ingest(
        [r for r in results if r is not None], store, cfg, operation=operation, extra_rows=staged
    )
    if cleanup:
        remove_tree(staging)
    return report


def report_dict(report: IngestReport) -> dict[str, Any]:
    """A compact summary (no per-file entries) for flows and artifacts."""
    return {"version": report.version, "rows_added": report.rows_added, **report.counts}
