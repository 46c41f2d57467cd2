"""Ingest folders of scans: walk, decode in parallel, de-identify, de-duplicate, commit one version."""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvae._io import atomic_write_text, read_bounded
from medvae.config import IngestConfig, to_jsonable
from medvae.data import statcache
from medvae.data.deid import allowed_meta, keyed_hash, patient_from_name, split_for
from medvae.data.staging import read_bytes, remove_tree, write_bytes
from medvae.data.statcache import source_prefix, stat_keys
from medvae.data.walk import label_for, read_labels_csv, walk_paths

if TYPE_CHECKING:  # the store pulls in deltalake and pyarrow, which spawned decoder workers never need
    import pyarrow as pa

    from medvae.data.store import Store

INGESTED, REJECTED, SKIPPED = "ingested", "rejected", "skipped"
ALREADY_STORED = "already in the store (same content)"
COMMITTED_CONCURRENTLY = "already in the store: committed by a concurrent ingest"
# Files per decode batch: CLAHE is vectorised over a batch, and below ~16 images its fixed costs show.
MIN_BATCH, MAX_BATCH = 16, 64
# A file with an image of more pixels is text-screened alone at decode, not with its batch (memory).
BATCH_SCREEN_PIXELS = 512 * 512
_LET_GO = np.zeros((0, 0), dtype=np.float32)  # the pixels of a decoded image no longer needed
POOL_MIN_FILES = 64  # below this, decoding in this process beats starting a pool (~1 s on two cores)


@dataclass
class FileResult:
    """What happened to one input file: its status, and the reason when it was rejected or skipped.

    ``source`` (the 128-bit prefix of its source id) and ``stat`` (its stat-cache key) let the stat cache
    learn the file; neither is written to the report.
    """

    path: str
    status: str
    reason: str | None = None
    ids: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    source: bytes | None = field(default=None, repr=False)
    stat: bytes | None = field(default=None, repr=False)


@dataclass
class IngestReport:
    """The full account of one ingest: every file seen, with its status."""

    files: list[FileResult]
    version: int | None
    store: str
    warnings: list[str] = field(default_factory=list)  # what the operator should know (no label values)

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
            "warnings": self.warnings,
            "files": [
                {"path": f.path, "status": f.status, "reason": f.reason, "ids": f.ids} for f in self.files
            ],
        }

    def write(self, path: Path) -> None:
        """Write the JSON report atomically."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))


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

    @classmethod
    def from_arrow(cls, source_ids: pa.ChunkedArray) -> KnownIds:
        """The known ids of a store's ``source_id`` column, hex-decoded in numpy (no Python string per id:
        this runs at the start of every ingest, no-op re-ingests included)."""
        col = source_ids.drop_null().combine_chunks() if source_ids.num_chunks else None
        if col is None or not len(col):
            return cls()
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
        if not (np.diff(offsets) == 64).all():  # not all keyed-hash hex: the general path
            return cls(v for v in col.to_pylist())
        start = int(offsets[0])
        text = np.frombuffer(col.buffers()[2], dtype=np.uint8, count=64 * len(col), offset=start)
        return cls(array=_unhex_rows(text.reshape(len(col), 64)[:, :32]))

    def __len__(self) -> int:
        return int(self._a.size)

    def __contains__(self, source_id: object) -> bool:
        if not isinstance(source_id, str) or not self._a.size:
            return False
        k = np.array(bytes.fromhex(source_id[:32]), dtype="S16")
        j = int(np.searchsorted(self._a, k))
        return j < self._a.size and bool(self._a[j] == k)

    def prefixes(self) -> np.ndarray:
        """The sorted ``S16`` prefixes (read-only)."""
        view = self._a.view()
        view.flags.writeable = False
        return view

    def contains_prefixes(self, prefixes: np.ndarray) -> np.ndarray:
        """For an ``S16`` array of source-id prefixes, which are in the store (a bool mask)."""
        return np.isin(prefixes, self._a)

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


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _unhex_rows(text: np.ndarray) -> np.ndarray:
    """Rows of ASCII hex digits (uint8, an even number per row) as ``S{digits/2}`` bytes, like
    ``bytes.fromhex`` on each row.

    Raises:
        ValueError: on a character that is not a hex digit.
    """
    nibbles = _HEX_VALUE[text]
    if (nibbles == 255).any():
        raise ValueError("not a hexadecimal id")
    raw = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(raw).view(f"S{raw.shape[1]}").ravel()


# ------------------------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class DecodeContext:
    """What decoding a file needs besides the file: the store's key, the ids it holds, the config.

    ``known`` is anything with ``in``: a :class:`KnownIds` (compact enough to ship to every worker of a
    large archive) or a set of source ids.
    """

    key: bytes
    known: Any
    cfg: IngestConfig


_W: dict[str, Any] = {}


def _init_worker(key: bytes, known: Any, cfg_json: str) -> None:
    # Runs once per worker process (medvae._pool pins its BLAS): config, key and known ids are shipped once.
    _W["ctx"] = DecodeContext(key, known, IngestConfig.model_validate_json(cfg_json))


def _decode_in_worker(jobs: list[tuple[str, str | None]]) -> list[FileResult]:
    """:func:`decode_many` with the context that :func:`_init_worker` installed in this process."""
    return decode_many(jobs, _W["ctx"])


@dataclass
class _Decoded:
    """A file decoded and normalised, waiting for the batch's intensity standardisation."""

    path: str
    label: str | None
    source_id: str
    images: list[Any]  # readers.DecodedImage
    normalised: list[np.ndarray]
    note: str | None = None  # why the label was withheld, if it was
    screened: bool = False  # the text screen has run (a large file, screened alone)


def decode_one(job: tuple[str, str | None], ctx: DecodeContext) -> FileResult:
    """:func:`decode_many` of one file."""
    return decode_many([job], ctx)[0]


def decode_many(jobs: Sequence[tuple[str, str | None]], ctx: DecodeContext) -> list[FileResult]:
    """Decode files into store rows, or say why not. Never raises: every file gets a result.

    Each file is read, hashed, decoded and normalised on its own; the intensity standardisation (CLAHE)
    then runs once over every image of the batch, vectorised.

    Args:
        jobs: each file's path and its label (None when unlabelled).
        ctx: the store key, the source ids already stored, and the ingest config.

    Returns:
        One result per job, in order; ingested ones hold their rows (with the pixels).
    """
    results: list[FileResult] = []
    pending: list[tuple[int, _Decoded]] = []
    for job in jobs:
        out = _read_and_normalise(job, ctx)
        if isinstance(out, _Decoded):
            pending.append((len(results), out))
            out = FileResult(out.path, INGESTED, source=source_prefix(out.source_id))
        results.append(out)
    rejected = _screen_text(pending, ctx.cfg)
    results = [rejected.get(i, r) for i, r in enumerate(results)]
    pending = [(i, dec) for i, dec in pending if i not in rejected]
    if pending:
        for (i, dec), pixels in zip(pending, _standardise(pending, ctx.cfg), strict=True):
            results[i] = _rows_of(dec, pixels, ctx) if isinstance(pixels, np.ndarray) else pixels
    return results


def _read_and_normalise(job: tuple[str, str | None], ctx: DecodeContext) -> FileResult | _Decoded:
    """Read, hash, decode and normalise one file; a FileResult when it is rejected or already stored."""
    from medvae.data.labels import vet_label
    from medvae.data.prepare import normalised_image
    from medvae.data.readers import RejectedInput, decode_bytes

    path_s, label = job
    cfg = ctx.cfg
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
    data = _read_file(path_s, cfg)
    if isinstance(data, FileResult):
        return data
    source_id = keyed_hash(ctx.key, "source", data)
    if source_id in ctx.known:
        return FileResult(path_s, SKIPPED, ALREADY_STORED, source=source_prefix(source_id))
    try:
        # The burned-in text screen runs once over the whole batch (_screen_text): per file, its
        # fixed costs were most of an ingest's CPU time.
        images = decode_bytes(data, os.path.basename(path_s), cfg, screen_text=False)
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
    try:
        normalised = [normalised_image(img.pixels, cfg) for img in images]
    except Exception as exc:
        return FileResult(path_s, REJECTED, f"cannot normalise image: {type(exc).__name__}: {exc}")
    dec = _Decoded(path_s, label, source_id, images, normalised, label_note)
    if any(img.pixels.size > BATCH_SCREEN_PIXELS for img in images):
        # Screened now, alone, and its full-size pixels let go: a batch of 64 files must not hold 64
        # full-size CRs (2.3 GB at 3000 px) until the batch's text screen.
        rejected = _screen_one(dec, cfg, None)
        if rejected is not None:
            return rejected
        dec.images = [replace(img, pixels=_LET_GO) for img in dec.images]
        dec.screened = True
    return dec


def _screen_text(pending: list[tuple[int, _Decoded]], cfg: IngestConfig) -> dict[int, FileResult]:
    """The burned-in text screen over a batch of decoded files, in one vectorised call.

    Returns:
        The results of the files the policy rejects, by their position in the batch. A file kept with
        a finding (``burned_in_text: ingest``) gets the finding in its note; the others are unchanged.
    """
    from medvae.data.readers import text_screen_frames
    from medvae.data.textscreen import find_text_batch

    todo = [(i, dec) for i, dec in pending if not dec.screened]
    if cfg.burned_in_text == "off" or not todo:
        return {}
    picks = [text_screen_frames(dec.images) for _, dec in todo]
    pixels = [dec.images[f].pixels for (_, dec), frames in zip(todo, picks, strict=True) for f in frames]
    found = iter(find_text_batch(pixels, cfg.size, cfg.burned_in_min_text_px))
    rejected: dict[int, FileResult] = {}
    for (i, dec), frames in zip(todo, picks, strict=True):
        result = _screen_one(dec, cfg, [next(found) for _ in frames])
        if result is not None:
            rejected[i] = result
    return rejected


def _screen_one(dec: _Decoded, cfg: IngestConfig, found: list[Any] | None) -> FileResult | None:
    """The text screen's verdict on one file (``found``: its batch findings, None: screen it here).

    Returns:
        The file's result when the policy rejects it; else None, with any finding added to its note.
    """
    from medvae.data.readers import RejectedInput, screen_burned_in_text

    before = len(dec.images[0].notes)
    try:
        dec.images = screen_burned_in_text(dec.images, cfg, found)
    except RejectedInput as exc:
        return FileResult(dec.path, REJECTED, exc.reason)
    # The report says why a kept file was flagged, beside any label note.
    notes = [*([dec.note] if dec.note else []), *dec.images[0].notes[before:]]
    dec.note = "; ".join(notes) or None
    return None


def _read_file(path: str, cfg: IngestConfig) -> bytes | FileResult:
    """The bytes of a regular file within the size limit, or why not.

    Stat first: opening a FIFO or a device would block or read without end. Plain ``os`` calls on the
    string, as this runs for every file of an archive.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return FileResult(path, REJECTED, f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > cfg.max_file_bytes:
            return FileResult(
                path,
                REJECTED,
                f"file is {st.st_size} bytes, over max_file_bytes={cfg.max_file_bytes}; not read "
                "(raise max_file_bytes to ingest it)",
            )
        with open(path, "rb") as fh:
            # Bounded: the file may have grown since stat(); decode_bytes refuses what is over.
            return read_bounded(fh, st.st_size, cfg.max_file_bytes)
    except OSError as exc:
        return FileResult(path, REJECTED, f"cannot read file: {exc.strerror or type(exc).__name__}")


def _standardise(pending: list[tuple[int, _Decoded]], cfg: IngestConfig) -> list[np.ndarray | FileResult]:
    """Each pending file's standardised images, ``(frames, size, size)``: one vectorised call for the batch.

    Should the batch call fail (a bug), each file is standardised alone, so only a file that itself
    fails is rejected.
    """
    from medvae.data.prepare import standardised

    counts = [len(dec.normalised) for _, dec in pending]
    try:
        stack = standardised(np.stack([im for _, dec in pending for im in dec.normalised]), cfg)
        return list(np.split(stack, np.cumsum(counts)[:-1]))
    except Exception:
        pass
    out: list[np.ndarray | FileResult] = []
    for _, dec in pending:
        try:
            out.append(standardised(np.stack(dec.normalised), cfg))
        except Exception as exc:
            out.append(
                FileResult(dec.path, REJECTED, f"cannot standardise image: {type(exc).__name__}: {exc}")
            )
    return out


def _rows_of(dec: _Decoded, pixels: np.ndarray, ctx: DecodeContext) -> FileResult:
    """The store rows of one decoded file (one per image), de-identified."""
    cfg, key = ctx.cfg, ctx.key
    rows: list[dict[str, Any]] = []
    for img, pix in zip(dec.images, pixels, strict=True):
        patient = img.patient_ref or patient_from_name(os.path.basename(dec.path), cfg.patient_regex)
        # surrogatepass: a patient ID cut from a non-UTF-8 file name holds surrogate escapes, which plain
        # encode() refuses (an exception outside any handler); this encoding is still one-to-one.
        patient_key = (
            keyed_hash(key, "patient", patient.encode("utf-8", "surrogatepass"))[:32] if patient else None
        )
        meta = allowed_meta(img.meta)
        spacing = meta.pop("pixel_spacing") or [None, None]
        sid = dec.source_id
        rows.append(
            {
                **meta,
                "id": sid[:32] if len(dec.images) == 1 else f"{sid[:32]}-f{img.frame_index}",
                "source_id": sid,
                "patient_key": patient_key,
                "frame": img.frame_index,
                "n_frames": img.n_frames,
                "height": cfg.size,
                "width": cfg.size,
                "pixels": np.ascontiguousarray(pix).tobytes(),
                "label": dec.label,
                "split": split_for(key, patient_key or sid, cfg.split_fractions),
                "origin": "real",
                "pixel_spacing_row": spacing[0],
                "pixel_spacing_col": spacing[1],
            }
        )
    ids = [r["id"] for r in rows]
    return FileResult(dec.path, INGESTED, dec.note, ids=ids, rows=rows, source=source_prefix(dec.source_id))


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


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class IngestPlan:
    """The walked input of one ingest, before any file is decoded.

    Attributes:
        results: one slot per walked file, in walk order; files the walk itself rejected, and files the
            stat cache recognised as already stored, are filled in.
        jobs: ``(slot, (path, label))`` for every file still to decode.
        key: the store's HMAC key (never leaves the machine that plans and the workers that decode).
        known: source ids already in the store; files with that content are skipped without decoding.
        stats: each job slot's stat-cache key (absent when the file could not be stat'ed).
    """

    results: list[FileResult | None]
    jobs: list[tuple[int, tuple[str, str | None]]]
    key: bytes
    known: KnownIds
    stats: dict[int, bytes] = field(default_factory=dict)


def plan_ingest(sources: Sequence[Path], store: Store, cfg: IngestConfig) -> IngestPlan:
    """Walk ``sources``, check the store's image settings, and list the files to decode.

    Files whose path and metadata the stat cache knows, with content still in the store, are skipped here
    without being opened (:mod:`medvae.data.statcache`). Creates the store's key on first use, so that
    workers elsewhere can read it.

    Raises:
        StoreError: when the store holds images made with other image settings, or cannot be read.
    """
    csv_labels = read_labels_csv(cfg.labels_csv) if cfg.labels_csv else None
    walked = list(walk_paths(sources))
    results: list[FileResult | None] = [None] * len(walked)
    jobs: list[tuple[int, tuple[str, str | None]]] = []
    for i, (path, walk_error) in enumerate(walked):
        if walk_error is not None:
            results[i] = FileResult(path, REJECTED, walk_error)
        else:
            jobs.append((i, (path, label_for(path, cfg, csv_labels))))
    known = KnownIds()
    if store.exists():
        _check_image_settings(store, cfg)
        known = KnownIds.from_arrow(store.column("source_id"))
    plan = IngestPlan(results, jobs, store.key(), known)
    _skip_cached(plan, store)
    return plan


def _check_image_settings(store: Store, cfg: IngestConfig) -> None:
    """One store holds one kind of image: refuse to mix, say, CLAHE-standardised and raw pixels."""
    from medvae.data.store import StoreError, image_settings_of

    prior, mine = store.image_settings(), image_settings_of(to_jsonable(cfg))
    if prior is not None and prior != mine:
        diff = ", ".join(f"{k}={prior[k]}" for k in prior if prior[k] != mine[k])
        raise StoreError(
            f"store {store.uri} holds images ingested with {diff}; ingest with the same settings "
            "(--set key=value) or into a new store"
        )


def _skip_cached(plan: IngestPlan, store: Store) -> None:
    """Stat every job's file, and fill in the ones the stat cache knows to be in the store."""
    regular: list[tuple[int, str, os.stat_result]] = []
    for slot, (path, _) in plan.jobs:
        try:
            st = os.stat(path)
        except OSError:
            continue  # the decoder says what is wrong with it
        if stat.S_ISREG(st.st_mode):
            regular.append((slot, path, st))
    keys = stat_keys(plan.key, [(path, st) for _, path, st in regular])
    plan.stats = {slot: k for (slot, _, _), k in zip(regular, keys, strict=True)}
    if not len(plan.known) or not plan.stats:
        return
    slots = list(plan.stats)
    found, prefixes = statcache.load(store.uri).lookup([plan.stats[s] for s in slots])
    hit = found & plan.known.contains_prefixes(prefixes)
    if not hit.any():
        return
    done = {s for s, h in zip(slots, hit.tolist(), strict=True) if h}
    for slot, (path, _) in plan.jobs:
        if slot in done:
            plan.results[slot] = FileResult(path, SKIPPED, ALREADY_STORED, stat=plan.stats[slot])
    plan.jobs = [j for j in plan.jobs if j[0] not in done]


def _remember(store: Store, results: Sequence[FileResult], known: KnownIds) -> None:
    """Add to the stat cache every file whose content is now in the store (see :mod:`statcache`)."""
    pairs = [
        (r.stat, r.source)
        for r in results
        if r.stat is not None and r.source is not None and r.status in (INGESTED, SKIPPED)
    ]
    if not pairs:
        return  # nothing new to remember: a no-op re-ingest writes nothing
    in_store = np.concatenate([known.prefixes(), np.array([p for _, p in pairs], dtype="S16")])
    statcache.save(store.uri, statcache.load(store.uri).merged(pairs, keep=in_store))


# -------------------------------------------------------------------------------------------- ingest
def ingest(
    sources: Sequence[Path],
    store: Store,
    cfg: IngestConfig,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    operation: str = "ingest",
) -> IngestReport:
    """Ingest every file under ``sources`` into ``store`` as exactly one new version.

    Files are decoded on every core, in batches (so that CLAHE runs vectorised over each batch); the
    process pool starts only when there are enough files to decode. Content already in the store, or
    repeated within this batch, is skipped; files that cannot or must not be ingested are rejected with
    a reason. A broken file never stops the run. Nothing that identifies a patient, a date, an original
    UID or a source path is written.

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
    slots = iter([slot for slot, _ in plan.jobs])
    init_args = (plan.key, plan.known, cfg.model_dump_json())
    for batch in _run_jobs([j for _, j in plan.jobs], cfg, init_args):
        for res, slot in zip(batch, slots, strict=False):  # batches come back in job order
            res.stat = plan.stats.get(slot)
            plan.results[slot] = res
        done += len(batch)
        if on_progress:
            on_progress(done, total)
    results = [r for r in plan.results if r is not None]
    report = commit_ingest(results, store, cfg, operation=operation)
    _remember(store, results, plan.known)
    return report


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
    outcome does not depend on how the files were split among workers. The report says what this call
    really committed: a file whose rows a concurrent ingest committed first is skipped ("committed by a
    concurrent ingest"), and the version and ``rows_added`` are those of the commit itself, in the report
    and in the version's lineage alike.

    Args:
        results: every walked file's result, in walk order; ingested ones carry their rows, unless the
            rows come in ``extra_rows``.
        store: the destination store.
        cfg: the ingest config (recorded in the lineage).
        operation: the operation name recorded in the lineage.
        extra_rows: rows staged by batch workers (Arrow tables in the store schema), keyed by ``id``.

    Returns:
        The report, with the new version (None when nothing new was committed).

    Raises:
        StoreError: when the store cannot be written.
    """
    from medvae.data.store import StoreError, brief, lineage

    _skip_batch_duplicates(results)
    rows = _rows_to_commit(results, extra_rows)
    report = IngestReport(results, None, store.uri, _label_warnings(rows))
    base: dict[str, Any] = {}
    if rows.num_rows:  # lineage runs git: only for a version that will be written
        reasons = Counter((r.reason or "").split(":")[0] for r in results if r.status == REJECTED)
        base = lineage(operation, to_jsonable(cfg), rejected_reasons=dict(reasons))

    def meta(added: frozenset[str]) -> dict[str, Any]:
        # Called with the ids the merge really adds, again on each retry over a newer snapshot.
        counts = IngestReport(_as_committed(results, added), None, store.uri).counts
        return {**base, "counts": counts, "rows_added": len(added)}

    try:
        committed = store.insert_new(rows, meta)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot write to store {store.uri}: {brief(exc)}") from exc
    report.files = _as_committed(results, committed.ids if committed is not None else frozenset())
    report.version = committed.version if committed is not None else None
    return report


def _label_warnings(rows: pa.Table) -> list[str]:
    """Warn when this batch's labels look like one per patient (folder names of a PACS export)."""
    from medvae.data.labels import labels_per_patient_warning

    if not rows.num_rows:
        return []
    w = labels_per_patient_warning(rows.column("label").to_pylist(), rows.column("patient_key").to_pylist())
    return [w] if w else []


def _skip_batch_duplicates(results: list[FileResult]) -> None:
    """Mark files whose content an earlier file of the same batch already has (walk order wins)."""
    seen_ids: set[str] = set()
    for r in results:
        if r.status != INGESTED:
            continue
        if any(i in seen_ids for i in r.ids):
            r.status, r.reason, r.rows, r.ids = (
                SKIPPED,
                "duplicate of another file in this batch (same content)",
                [],
                [],
            )
            continue
        seen_ids.update(r.ids)


def _rows_to_commit(results: list[FileResult], extra_rows: Iterable[pa.Table]) -> pa.Table:
    """The rows of every file still ingested, in walk order, one per id: from the results themselves
    or, for a batched ingest, from the staged tables."""
    import pyarrow as pa

    from medvae.data.store import SCHEMA, empty_rows, to_arrow

    buf = empty_rows()
    for r in results:
        for row in r.rows:
            for k in buf:
                buf[k].append(row.get(k))
        r.rows = []  # the pixels now live in the Arrow table only
    rows = to_arrow(buf)
    staged = [t.cast(SCHEMA) for t in extra_rows]
    if not staged:
        return rows
    order = {i: n for n, i in enumerate(i for r in results if r.status == INGESTED for i in r.ids)}
    all_staged = pa.concat_tables(staged)
    first: dict[str, int] = {}
    for n, i in enumerate(all_staged.column("id").to_pylist()):
        if i in order and i not in first:
            first[i] = n
    take = pa.array([first[i] for i in sorted(first, key=order.__getitem__)], type=pa.int64())
    return pa.concat_tables([rows, all_staged.take(take)])


def _as_committed(results: list[FileResult], added: frozenset[str]) -> list[FileResult]:
    """``results`` as they stand once ``added`` is what the commit really added: an ingested file none of
    whose rows were added was committed by a concurrent ingest first, and is skipped."""
    out = []
    for r in results:
        if r.status == INGESTED:
            kept = [i for i in r.ids if i in added]
            if not kept:
                r = FileResult(r.path, SKIPPED, COMMITTED_CONCURRENTLY, source=r.source, stat=r.stat)
            elif len(kept) != len(r.ids):
                r = FileResult(r.path, INGESTED, None, ids=kept, source=r.source, stat=r.stat)
        out.append(r)
    return out


def _run_jobs(
    jobs: list[tuple[str, str | None]], cfg: IngestConfig, init_args: tuple[bytes, KnownIds, str]
) -> Iterator[list[FileResult]]:
    """Decode ``jobs`` in batches, in order: in this process when there are few, else on a process pool
    that is started once, only now that there is something to decode."""
    if not jobs:
        return
    workers = min(cfg.workers or os.cpu_count() or 1, math.ceil(len(jobs) / MIN_BATCH))
    if workers <= 1 or len(jobs) < POOL_MIN_FILES:
        # A pool costs ~1 s to start; small batches are faster in-process. The thread limit is scoped
        # so that whatever runs next in this process (training) keeps all its threads.
        from threadpoolctl import threadpool_limits

        ctx = DecodeContext(init_args[0], init_args[1], IngestConfig.model_validate_json(init_args[2]))
        with threadpool_limits(1):
            for i in range(0, len(jobs), MAX_BATCH):
                yield decode_many(jobs[i : i + MAX_BATCH], ctx)
        return
    from medvae._pool import process_pool

    # Batches big enough for CLAHE to vectorise, small enough that every core stays busy to the end and
    # progress moves: about eight per worker, within MIN_BATCH..MAX_BATCH files.
    size = max(MIN_BATCH, min(MAX_BATCH, math.ceil(len(jobs) / (workers * 8))))
    batches = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with process_pool(workers, _init_worker, init_args) as pool:
        yield from pool.map(_decode_in_worker, batches)


# ------------------------------------------------------------------- batches on a task runner
# The same plan -> decode -> commit as :func:`ingest`, split into steps that a Prefect task runner (a
# thread or process pool, or a Dask cluster) can run on other processes or machines. The steps hand over
# files in a staging folder beside the store (local or object storage), never pixels or the store key:
# task parameters and results end up in Prefect's database, and the key must not.
PLAN_FILE = "plan.json"


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
    # Workers elsewhere read the files by absolute path; the report keeps the paths as given. Stat-cache
    # keys are keyed hashes, like the source ids the staged rows hold.
    entries = [
        [slot, path, os.path.abspath(path), label, _hex(plan.stats.get(slot))]
        for slot, (path, label) in plan.jobs
    ]
    batches = [entries[i : i + batch_files] for i in range(0, len(entries), batch_files)]
    planned = [
        {"slot": i, "path": r.path, "status": r.status, "reason": r.reason, "stat": _hex(r.stat)}
        for i, r in enumerate(plan.results)
        if r is not None
    ]
    # A fresh name per plan: workers cache the known ids by name, and a staging folder may be reused.
    known = f"known-{os.urandom(8).hex()}.npy"
    write_bytes(f"{staging}/{known}", plan.known.to_bytes())
    for n, batch in enumerate(batches):
        write_bytes(f"{staging}/batch-{n:06d}.json", json.dumps({"known": known, "files": batch}).encode())
    summary = {"files": len(plan.results), "batches": len(batches), "known": known, "planned": planned}
    write_bytes(f"{staging}/{PLAN_FILE}", json.dumps(summary).encode())
    return {"staging": staging, "batches": len(batches), "files": len(plan.results)}


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(h: str | None) -> bytes | None:
    return None if h is None else bytes.fromhex(h)


def decode_batch(staging: str, index: int, store: Store, cfg: IngestConfig) -> dict[str, Any]:
    """Decode batch ``index`` of a staged plan and stage its rows and per-file results.

    Runs on any worker that can read the scans and the store. Re-running it (a retry) rewrites the same
    files. Never raises for a bad scan: each one is rejected with its reason.

    Returns:
        ``{"batch", "files", "ingested", "rejected", "skipped"}`` for this batch.
    """
    import pyarrow.parquet as pq
    from pyarrow import BufferOutputStream
    from threadpoolctl import threadpool_limits

    from medvae.data.store import empty_rows, to_arrow

    batch = json.loads(read_bytes(f"{staging}/batch-{index:06d}.json"))
    entries = batch["files"]
    ctx = DecodeContext(store.key(create=False), _known_ids(f"{staging}/{batch['known']}"), cfg)
    files: list[dict[str, Any]] = []
    buf = empty_rows()
    with threadpool_limits(1):  # one batch per worker core; see medvae._pool
        for i in range(0, len(entries), MAX_BATCH):
            part = entries[i : i + MAX_BATCH]
            for entry, res in zip(part, decode_many([(e[2], e[3]) for e in part], ctx), strict=True):
                slot, shown = entry[0], entry[1]
                files.append(
                    {
                        "slot": slot,
                        "path": shown,
                        "status": res.status,
                        "reason": res.reason,
                        "ids": res.ids,
                        "source": _hex(res.source),
                        "stat": entry[4] if len(entry) > 4 else None,
                    }
                )
                for row in res.rows:
                    for k in buf:
                        buf[k].append(row.get(k))
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
    for w in plan["planned"]:
        results[w["slot"]] = FileResult(w["path"], w["status"], w["reason"], stat=_unhex(w["stat"]))
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
            results[f["slot"]] = FileResult(
                f["path"],
                f["status"],
                f["reason"],
                list(f["ids"]),
                source=_unhex(f["source"]),
                stat=_unhex(f["stat"]),
            )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise StoreError(f"{len(missing)} files of {staging} have no result; re-run the ingest")
    done = [r for r in results if r is not None]
    report = commit_ingest(done, store, cfg, operation=operation, extra_rows=staged)
    _remember(store, done, KnownIds.from_bytes(read_bytes(f"{staging}/{plan['known']}")))
    if cleanup:
        remove_tree(staging)
    return report


def report_dict(report: IngestReport) -> dict[str, Any]:
    """A compact summary (no per-file entries) for flows and artifacts."""
    return {"version": report.version, "rows_added": report.rows_added, **report.counts}
