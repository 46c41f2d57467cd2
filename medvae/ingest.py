"""Ingest folders of scans: walk, decode in parallel, de-identify, de-duplicate, commit one version."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvae.config import IngestConfig, to_jsonable
from medvae.deid import allowed_meta, keyed_hash, patient_from_name, split_for

if TYPE_CHECKING:  # the store pulls in deltalake and pyarrow, which spawned decoder workers never need
    from medvae.store import Store

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


# ------------------------------------------------------------------------------------------- walking
def iter_files(sources: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """Yield every file under ``sources`` (files or folders), with a walk error when one occurred.

    Directory symlinks are not followed, so a symlink loop cannot trap the walk; such links are yielded
    with a reason so that they are still accounted for. Order is sorted for reproducible reports.
    """
    for src in sources:
        if not os.path.lexists(src):
            yield src, "does not exist"
            continue
        if not src.is_dir():
            # Files, and also what is neither file nor folder (a FIFO, a device, a symlink loop or a
            # dangling link): the decoder stage says exactly what is wrong with it, where os.walk would
            # only report "cannot list folder: Not a directory".
            yield src, None
            continue
        errors: list[OSError] = []
        for root, dirs, files in os.walk(src, onerror=errors.append, followlinks=False):
            dirs.sort()
            for d in list(dirs):
                p = Path(root) / d
                if p.is_symlink():
                    yield p, "directory symlink not followed (avoids loops; pass its target explicitly)"
            for name in sorted(files):
                yield Path(root) / name, None
        for err in errors:
            yield Path(err.filename or str(src)), f"cannot list folder: {err.strerror or err}"


def read_labels_csv(path: Path) -> dict[str, str]:
    """Read a ``path,label`` CSV. Paths may be relative to the CSV's folder, absolute, or bare file names."""
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a labels CSV needs the columns path,label (got {reader.fieldnames})")
        for row in reader:
            p = Path(row["path"])
            full = p if p.is_absolute() else (path.parent / p)
            out[os.path.normpath(full.resolve())] = row["label"]
            out.setdefault(p.name, row["label"])
    return out


# ------------------------------------------------------------------------------------------- workers
_W: dict[str, Any] = {}


def _init_worker(key: bytes, known: frozenset[str], cfg_json: str, pool_worker: bool = True) -> None:
    # Runs once per worker process: the config, key and known ids are shipped once, not per file.
    if pool_worker:
        # Parallelism comes from processes, one per core; multi-threaded BLAS inside each would
        # oversubscribe the cores, and spinning BLAS threads then make a 0.2 ms resize take 10 ms.
        from threadpoolctl import threadpool_limits

        _W["limits"] = threadpool_limits(1)
    _W["key"] = key
    _W["known"] = known
    _W["cfg"] = IngestConfig.model_validate_json(cfg_json)


def stored_image(img01: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    """A decoded, windowed ``[0, 1]`` image in the form the store keeps: square, 64×64, standardised uint8.

    Ingest and screening both go through here, so a scan screened straight from the scanner is
    prepared exactly as the training images were.

    Args:
        img01: a 2-D float image in ``[0, 1]`` from :mod:`medvae.readers`.
        cfg: the ingest settings (size, aspect policy, intensity standardisation).

    Returns:
        A uint8 array of shape ``(cfg.size, cfg.size)``.
    """
    from medvae.transforms import normalise, standardise_intensity

    return standardise_intensity(normalise(img01, cfg.size, cfg.aspect), cfg.intensity, cfg.clahe_clip_limit)


def _process(job: tuple[str, str | None]) -> FileResult:
    """Decode one file into store rows, or say why not. Never raises: every file gets a result."""
    from medvae.readers import RejectedInput, decode_bytes

    path_s, label = job
    cfg: IngestConfig = _W["cfg"]
    key: bytes = _W["key"]
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
    if source_id in _W["known"]:
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
    return FileResult(path_s, INGESTED, None, ids=[r["id"] for r in rows], rows=rows)


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


# ------------------------------------------------------------------------------------------- ingest
def _label_for(path: Path, cfg: IngestConfig, csv_labels: dict[str, str] | None) -> str | None:
    if csv_labels is not None:
        return csv_labels.get(os.path.normpath(path.resolve()), csv_labels.get(path.name))
    if cfg.labels == "folder":
        return path.parent.name or None
    return None


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
    from medvae.store import StoreError, empty_rows, image_settings_of, lineage, to_arrow

    csv_labels = read_labels_csv(cfg.labels_csv) if cfg.labels_csv else None
    walked = list(iter_files(sources))
    results: list[FileResult | None] = [None] * len(walked)
    jobs: list[tuple[int, tuple[str, str | None]]] = []
    for i, (path, walk_error) in enumerate(walked):
        if walk_error is not None:
            results[i] = FileResult(str(path), REJECTED, walk_error)
        else:
            jobs.append((i, (str(path), _label_for(path, cfg, csv_labels))))

    if store.exists():
        # One store holds one kind of image: refuse to mix, say, CLAHE-standardised and raw pixels.
        prior, mine = store.image_settings(), image_settings_of(to_jsonable(cfg))
        if prior is not None and prior != mine:
            diff = ", ".join(f"{k}={prior[k]}" for k in prior if prior[k] != mine[k])
            raise StoreError(
                f"store {store.uri} holds images ingested with {diff}; ingest with the same settings "
                "(--set key=value) or into a new store"
            )
    key = store.key()
    known = frozenset(store.ids("source_id"))
    init_args = (key, known, cfg.model_dump_json())
    done = len(walked) - len(jobs)
    if on_progress:
        on_progress(done, len(walked))
    for (i, _), res in zip(jobs, _run_jobs([j for _, j in jobs], cfg, init_args), strict=True):
        results[i] = res
        done += 1
        if on_progress:
            on_progress(done, len(walked))

    final = [r for r in results if r is not None]
    # Content repeated inside this batch: the first file (in walk order) wins, the rest are skipped.
    seen_ids: set[str] = set()
    for r in final:
        if r.status != INGESTED:
            continue
        if any(i in seen_ids for i in r.ids):
            r.status, r.reason, r.rows = SKIPPED, "duplicate of another file in this batch (same content)", []
            r.ids = []
            continue
        seen_ids.update(r.ids)

    buf = empty_rows()
    for r in final:
        for row in r.rows:
            for k in buf:
                buf[k].append(row.get(k))
    report = IngestReport(final, None, store.uri)
    reasons = Counter((r.reason or "").split(":")[0] for r in final if r.status == REJECTED)
    meta = lineage(
        operation,
        to_jsonable(cfg),
        counts=report.counts,
        rows_added=report.rows_added,
        rejected_reasons=dict(reasons),
    )
    try:
        report.version = store.insert_new(to_arrow(buf), meta)
    except Exception as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"cannot write to store {store.uri}: {exc}") from exc
    for r in final:
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

        _init_worker(*init_args, pool_worker=False)
        with threadpool_limits(1):
            yield from map(_process, jobs)
        return
    # spawn, not fork: the parent may hold threads (Prefect, torch) that fork would copy mid-lock.
    ctx = mp.get_context("spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.map(_process, jobs, chunksize=chunk)


def report_dict(report: IngestReport) -> dict[str, Any]:
    """A compact summary (no per-file entries) for flows and artifacts."""
    return {"version": report.version, "rows_added": report.rows_added, **report.counts}
