"""The evaluation's data: a labelled ImageFolder tree or store version in memory, and its patient split."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae._io import atomic_write_bytes
from medvae.config import EvaluateConfig, IngestConfig, Intensity, ShiftSplitConfig
from medvae.data.deid import patient_from_name
from medvae.data.splits import (
    SPLITS,
    check_no_leak,
    cohort_split,
    grouped_subsample,
    merge_duplicate_groups,
    patient_split,
)

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
_CACHE_FORMAT = "medvae.eval-cache/2"  # 2: the cache holds no file names


@dataclass(eq=False)
class LabelledImages:
    """A labelled real dataset in memory.

    Attributes:
        images: uint8 (N, H, W).
        labels: the label name of each image, (N,) str.
        groups: the patient (or, without one, the image) each image belongs to, (N,) str.
        names: a per-image identifier (path relative to the source, or the store row id), (N,) str.
        batches: the acquisition batch of each image ("" for the default one), from its file name; None
            when the source keeps no file names (a store).
        orders: the acquisition order number of each image (-1: unknown), from its file name; None as
            for ``batches``.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    names: np.ndarray
    batches: np.ndarray | None = None
    orders: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------
# Decoding an ImageFolder tree
# --------------------------------------------------------------------------------------------------------


def list_image_folder(root: Path) -> list[tuple[Path, str]]:
    """Every image file under ``root`` with its label, the name of its parent folder (ImageFolder).

    Nested trees such as ``root/{train,valid,test}/{0_normal,1_abnormal}/*.png`` work too: the label is
    always the immediate parent folder, and the dataset's own split folders are ignored (the evaluation
    makes its own patient-grouped split). Hidden files and folders are skipped; the order is sorted.

    Args:
        root: the top folder.

    Returns:
        ``(path, label)`` pairs in sorted order.
    """
    root = Path(root)
    out: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if here == root:
            continue  # files directly under the root have no label folder
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in _IMAGE_SUFFIXES:
                out.append((here / f, here.name))
    return out


def _limit_threads() -> None:
    # One decoder process per core; multi-threaded BLAS inside each would oversubscribe the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _decode_one(job: tuple[str, str]) -> tuple[np.ndarray | None, str | None]:
    from medvae.data.prepare import prepare_file
    from medvae.data.readers import RejectedInput

    path_s, cfg_json = job
    try:
        # Unstandardised: the evaluation applies `EvaluateConfig.intensity` itself, so that an ablation
        # changes one knob and a cached decode serves every intensity setting.
        return prepare_file(Path(path_s), IngestConfig.model_validate_json(cfg_json), standardise=False), None
    except RejectedInput as exc:
        return None, exc.reason
    except Exception as exc:  # one unreadable file must not stop an evaluation of thousands
        return None, f"{type(exc).__name__}: {exc}"


def decode_files(
    paths: list[Path], cfg: IngestConfig, workers: int
) -> list[tuple[np.ndarray | None, str | None]]:
    """Decode and normalise files in parallel; the one place the evaluation fans work out to processes.

    Args:
        paths: the files.
        cfg: decoding settings (:func:`medvae.data.prepare.prepare_file`, unstandardised).
        workers: processes; 0: one per core. Small jobs run in this process.

    Returns:
        ``(image, None)`` or ``(None, reason)`` per file, in order.
    """
    cfg_json = cfg.model_dump_json()
    jobs = [(str(p), cfg_json) for p in paths]
    n_workers = workers or os.cpu_count() or 1
    if n_workers == 1 or len(jobs) < 64:
        return [_decode_one(j) for j in jobs]
    with ProcessPoolExecutor(n_workers, initializer=_limit_threads) as pool:
        return list(pool.map(_decode_one, jobs, chunksize=32))


def load_image_folder(
    root: Path,
    *,
    ingest_cfg: IngestConfig | None = None,
    workers: int = 0,
    files: list[tuple[Path, str]] | None = None,
) -> tuple[LabelledImages, list[tuple[str, str]]]:
    """Decode and normalise every image of an ImageFolder tree, exactly as ingest would (unstandardised).

    The patient comes from the file name with ``ingest_cfg.patient_regex``
    (:func:`medvae.data.deid.patient_from_name`); a file without a match is its own group.

    Args:
        root: the folder; labels are parent folder names.
        ingest_cfg: decoding and normalisation settings (defaults: 64×64, pad).
        workers: decoder processes; 0: one per core.
        files: ``list_image_folder(root)``, when the caller has walked the tree already.

    Returns:
        The images, and ``(relative path, reason)`` for every file that could not be decoded (for the
        operator's console only). An image's name is ``file-K``, its position in the sorted walk: file
        and folder names below the root may be patient names, and names reach metrics.json and the
        report, which are shared.
    """
    cfg = ingest_cfg or IngestConfig()
    root = Path(root)
    files = list_image_folder(root) if files is None else files
    results = decode_files([p for p, _ in files], cfg, workers)
    imgs: list[np.ndarray] = []
    labels: list[str] = []
    groups: list[str] = []
    names: list[str] = []
    rejected: list[tuple[str, str]] = []
    for k, ((path, label), (img, reason)) in enumerate(zip(files, results, strict=True)):
        rel = path.relative_to(root).as_posix()
        if img is None:
            rejected.append((rel, reason or "unknown"))
            continue
        imgs.append(img)
        labels.append(label)
        groups.append(patient_from_name(path.name, cfg.patient_regex) or f"image:{k}")
        names.append(f"file-{k}")
    data = LabelledImages(
        images=np.stack(imgs) if imgs else np.zeros((0, cfg.size, cfg.size), np.uint8),
        labels=np.array(labels, dtype=str),
        groups=np.array(groups, dtype=str),
        names=np.array(names, dtype=str),
    )
    return data, rejected


# --------------------------------------------------------------------------------------------------------
# Stores, the cache, and the source switch
# --------------------------------------------------------------------------------------------------------


def load_store(uri: str, version: int | None = None) -> LabelledImages:
    """The labelled real rows of a store version; the patient is the stored (keyed) patient hash.

    Args:
        uri: the store.
        version: the version; latest when None.

    Returns:
        The images; rows without a label are left out, rows without a patient key are their own group.
    """
    from medvae.data.store import Store, images_from

    table = Store(uri).read(version, where={"origin": "real"})
    labels = table.column("label").to_pylist()
    keep = np.array([lbl is not None for lbl in labels], dtype=bool)
    ids = table.column("id").to_pylist()
    pk = table.column("patient_key").to_pylist()
    images = images_from(table)
    return LabelledImages(
        images=images[keep],
        labels=np.array([lbl for lbl, k in zip(labels, keep, strict=True) if k], dtype=str),
        groups=np.array([p or f"image:{i}" for p, i, k in zip(pk, ids, keep, strict=True) if k], dtype=str),
        names=np.array([i for i, k in zip(ids, keep, strict=True) if k], dtype=str),
    )


def stored_intensity(uri: str) -> str:
    """The intensity standardisation a store's images already had at ingest, from its lineage.

    Returns:
        ``"none"``, ``"clahe"`` or ``"equalize"``.

    Raises:
        StoreError: when versions were ingested with different settings (their images do not compare).
    """
    from medvae.data.store import Store

    settings = Store(uri).image_settings()
    return str(settings["intensity"]) if settings else "none"


def _folder_signature(root: Path, files: list[tuple[Path, str]], cfg: IngestConfig) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    h.update(str(root.resolve()).encode())
    h.update(cfg.model_dump_json().encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(cache: Path, names: list[str]) -> tuple[LabelledImages, list[tuple[str, str]]]:
    with np.load(cache, allow_pickle=False) as z:
        data = LabelledImages(z["images"], z["labels"], z["groups"], z["names"])
        # Stored by position in the walk (``names``; the cache holds no file name): the signature pins it.
        rejected = [(names[int(k)], str(reason)) for k, reason in json.loads(str(z["rejected"]))]
    return data, rejected


def _write_cache(
    cache: Path, data: LabelledImages, rejected: list[tuple[str, str]], names: list[str]
) -> None:
    position = {name: k for k, name in enumerate(names)}
    rejected_at = [(position[name], reason) for name, reason in rejected]
    buf = io.BytesIO()
    np.savez(
        buf,
        images=data.images,
        labels=data.labels,
        groups=data.groups,
        names=data.names,
        rejected=np.array(json.dumps(rejected_at)),
    )
    atomic_write_bytes(cache, buf.getvalue())


def acquisition(walk: list[str], rows: np.ndarray, shift: ShiftSplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """The acquisition batch and order of each loaded image, read from its file name.

    Only these two values are kept: the names themselves may be patient names and never leave
    :func:`load_dataset`.

    Args:
        walk: the relative paths of the folder walk, in order.
        rows: the loaded images' names, ``file-K`` (K: the position in ``walk``).
        shift: the two regexes.

    Returns:
        ``(batches, orders)``: (N,) str ("" without a match) and (N,) int64 (-1 without a match).
    """
    import re

    batch_re = re.compile(shift.batch_regex) if shift.batch_regex else None
    order_re = re.compile(shift.order_regex) if shift.order_regex else None
    batches: list[str] = []
    orders: list[int] = []
    for row in rows.tolist():
        base = walk[int(row.rsplit("-", 1)[1])].rsplit("/", 1)[-1]
        b = batch_re.search(base) if batch_re else None
        o = order_re.search(base) if order_re else None
        batches.append((b.group("batch") or "") if b else "")
        orders.append(int(o.group("order")) if o and o.group("order") else -1)
    return np.array(batches, dtype=str), np.array(orders, dtype=np.int64)


def load_dataset(
    source: str | Path,
    *,
    store_version: int | None,
    ingest_cfg: IngestConfig,
    workers: int,
    cache_dir: Path | None,
    shift: ShiftSplitConfig | None = None,
) -> tuple[LabelledImages, dict[str, Any]]:
    """Load a store version or an ImageFolder tree, through an ``.npz`` cache for folders.

    Args:
        source: a store URI (when ``Store(source).exists()``) or an ImageFolder folder.
        store_version: the store version (stores only).
        ingest_cfg: decoding settings for folders.
        workers: decoder processes for folders.
        cache_dir: where decoded folders are cached (keyed by file names, sizes, mtimes and settings).
        shift: the shift-aware split's regexes: a folder's images get their acquisition batch and order.

    Returns:
        The images and a description of the source (kind, rejected files, cache use; stores: version and
        the intensity standardisation applied at ingest).

    Raises:
        FileNotFoundError: when the source is neither a store nor a folder.
    """
    from medvae.data.store import Store, is_local

    # A local folder without a Delta log is an ImageFolder (Store.exists() refuses such a folder).
    folder = is_local(str(source)) and Path(source).is_dir() and not (Path(source) / "_delta_log").is_dir()
    if not folder and Store(str(source)).exists():
        data = load_store(str(source), store_version)
        version = Store(str(source)).table(store_version).version()
        info = {"kind": "store", "uri": str(source), "version": version, "rejected": []}
        info["stored_intensity"] = stored_intensity(str(source))
        return data, info
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{source} is neither a medvae store nor an ImageFolder directory")
    files = list_image_folder(root)  # walked once: the cache key, the decode and the cache's positions
    names = [p.relative_to(root).as_posix() for p, _ in files]
    signature = _folder_signature(root, files, ingest_cfg)
    cache = None if cache_dir is None else cache_dir / f"images-{signature[:16]}.npz"
    cached = cache is not None and cache.exists()
    if cache is not None and cached:
        data, rejected = _read_cache(cache, names)
    else:
        data, rejected = load_image_folder(root, ingest_cfg=ingest_cfg, workers=workers, files=files)
        if cache is not None:
            _write_cache(cache, data, rejected, names)
    if shift is not None:
        data.batches, data.orders = acquisition(names, data.names, shift)
    return data, {"kind": "folder", "path": str(root), "cached": cached, "rejected": rejected}


def standardise_intensity(images: np.ndarray, method: Intensity, clip_limit: float = 0.01) -> np.ndarray:
    """:func:`medvae.data.transforms.standardise_intensity` over a uint8 (N, H, W) batch.

    Returns:
        uint8 (N, H, W); the input itself for ``"none"``.

    Raises:
        ValueError: for an unknown method.
    """
    from medvae.data.transforms import standardise_intensity as one

    if method == "none" or len(images) == 0:
        return images
    return np.stack([one(img, method, clip_limit) for img in images])


# --------------------------------------------------------------------------------------------------------
# The prepared evaluation data and its split
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EvalSplit:
    """Index sets of one evaluation: positions into :attr:`EvalData.x`.

    Attributes:
        train_normal: normal training images (the anomaly VAE's training set and latent reference).
        val_normal: normal validation images (early stopping and threshold calibration).
        test: every test image.
        test_y: 0 (normal) / 1 (abnormal) of each test image.
        train_all: every training image (the generator's training set).
        val_all: every validation image.
    """

    train_normal: np.ndarray
    val_normal: np.ndarray
    test: np.ndarray
    test_y: np.ndarray
    train_all: np.ndarray
    val_all: np.ndarray


@dataclass(eq=False)
class ShiftSplit:
    """The shift-aware split (:func:`medvae.data.splits.cohort_split`) and its new-cohort normals.

    Attributes:
        split: its index sets (test: the held-out batches and the earliest acquisitions of the others).
        assignment: ``"train"``/``"val"``/``"test"`` per image.
        held_out: the batches held out whole.
        batch: the acquisition batch of every image, (N,).
        new_normals: the held-out batches' test normals (positions).
        new_groups: their patients.
        local_count: how many of them a draw gives a site to recalibrate on (0: too few to draw).
    """

    split: EvalSplit
    assignment: np.ndarray
    held_out: tuple[str, ...]
    batch: np.ndarray
    new_normals: np.ndarray
    new_groups: np.ndarray
    local_count: int

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k``-th patient-grouped draw of local normals from the new cohort, and the rest.

        Returns:
            ``(local, unseen)`` positions: the normals a site recalibrates on, and those that measure it.
        """
        if not self.local_count:
            return np.zeros(0, dtype=np.int64), self.new_normals
        share = self.local_count / len(self.new_normals)
        pick = grouped_subsample(self.new_groups, np.full(len(self.new_groups), "normal"), share, seed=k)
        return self.new_normals[pick], self.new_normals[~pick]


@dataclass(eq=False)
class EvalData:
    """Everything the studies read: standardised images, 0/1 labels, merged patient groups and the split.

    Attributes:
        x: uint8 (N, H, W), intensity-standardised as configured.
        y01: 0 normal / 1 abnormal, (N,).
        groups: patients, with duplicate images joined into one group, (N,).
        source: the loaded images as read (labels and names for the report).
        assignment: ``"train"``/``"val"``/``"test"`` per image.
        split: the index sets.
        intensity: ``{"at_ingest", "applied_here"}``.
        shift: the shift-aware split, or None when it is off or the source gives no acquisition batch or
            order (``shift_note`` says why).
        shift_note: what the shift-aware split holds out, or why there is none.
    """

    x: np.ndarray
    y01: np.ndarray
    groups: np.ndarray
    source: LabelledImages
    assignment: np.ndarray
    split: EvalSplit
    intensity: dict[str, str]
    shift: ShiftSplit | None = None
    shift_note: str = ""


def prepare(data: LabelledImages, normal_label: str, cfg: EvaluateConfig, at_ingest: str) -> EvalData:
    """Check the labels, standardise once, and make the patient-grouped split (``cfg.split_seed``).

    Args:
        data: the loaded images.
        normal_label: the label of normal images; every other label is abnormal (positive).
        cfg: the evaluation settings.
        at_ingest: the standardisation a store already applied (``"none"`` for folders).

    Raises:
        ValueError: when the normal label is missing, there is no abnormal image, or a split is too small.
    """
    label_names = sorted(set(data.labels.tolist()))
    if normal_label not in label_names:
        raise ValueError(f"normal label {normal_label!r} not among the labels {label_names}")
    if len(label_names) < 2:
        raise ValueError(f"only the label {normal_label!r} is present: anomaly metrics need abnormal images")
    # A store ingested with a standardisation already holds standardised pixels: never apply it twice.
    applied: Intensity = cfg.intensity if at_ingest == "none" else "none"
    x = standardise_intensity(data.images, applied, cfg.clahe_clip_limit)
    y01 = (data.labels != normal_label).astype(np.int64)
    groups = merge_duplicate_groups(data.images, data.groups)
    assignment = patient_split(groups, y01.astype(str), cfg.split_fractions, cfg.split_seed)
    check_no_leak(groups, assignment)
    sp = index_sets(assignment, y01)
    intensity = {"at_ingest": at_ingest, "applied_here": applied}
    ed = EvalData(x, y01, groups, data, assignment, sp, intensity)
    if cfg.shift.enabled:
        try:
            ed.shift, ed.shift_note = shift_split(data, y01, groups, cfg)
        except ValueError as exc:  # the patient split still stands; the report says why there is no other
            ed.shift, ed.shift_note = None, str(exc)
    else:
        ed.shift_note = "it is off (shift.enabled: false)"
    return ed


def index_sets(assignment: np.ndarray, y01: np.ndarray) -> EvalSplit:
    """The index sets of a train/val/test assignment.

    Raises:
        ValueError: when the split leaves fewer than 2 normal train, 1 normal val, or test images of
            only one class.
    """
    idx = {s: np.flatnonzero(assignment == s) for s in SPLITS}
    sp = EvalSplit(
        train_normal=idx["train"][y01[idx["train"]] == 0],
        val_normal=idx["val"][y01[idx["val"]] == 0],
        test=idx["test"],
        test_y=y01[idx["test"]],
        train_all=idx["train"],
        val_all=idx["val"],
    )
    if len(sp.train_normal) < 2 or len(sp.val_normal) < 1 or len(np.unique(sp.test_y)) < 2:
        raise ValueError(
            "the split leaves too few images: need >= 2 normal train, >= 1 normal val, and normal and "
            f"abnormal test images (got {len(sp.train_normal)}, {len(sp.val_normal)}, "
            f"test labels {np.unique(sp.test_y).tolist()})"
        )
    return sp


def shift_split(
    data: LabelledImages, y01: np.ndarray, groups: np.ndarray, cfg: EvaluateConfig
) -> tuple[ShiftSplit, str]:
    """The shift-aware split of the loaded images, and a sentence saying what it holds out.

    Raises:
        ValueError: when the source has no acquisition batch or order, or the split is too small.
    """
    sc = cfg.shift
    if data.batches is None or data.orders is None:
        raise ValueError("a store keeps no file names, so no acquisition batch or order")
    present = sorted({b for b in data.batches.tolist() if b})
    held = tuple(present if sc.hold_out is None else [b for b in sc.hold_out if b in present])
    if not held and not (data.orders >= 0).any():
        raise ValueError("no file name matched shift.batch_regex or shift.order_regex")
    assignment = cohort_split(
        data.labels,
        groups,
        data.batches,
        data.orders,
        hold_out=held,
        test_fraction=sc.test_fraction,
        val_fraction=sc.val_fraction,
        seed=cfg.split_seed,
    )
    check_no_leak(groups, assignment)
    sp = index_sets(assignment, y01)
    new_normals = sp.test[(sp.test_y == 0) & np.isin(data.batches[sp.test], held)]
    take = min(sc.local_normals, len(new_normals) // 2)
    take = take if take >= 20 else 0  # fewer would make a recalibrated threshold a coin toss
    early = f"the earliest {sc.test_fraction:.0%} of every other batch and label by acquisition order"
    if held:
        what = f"held out whole: batch{'es' if len(held) > 1 else ''} {', '.join(held)}; plus {early}"
    else:  # e.g. ChestX-ray14 names: patient numbers, no batch
        what = f"no batch to hold out whole; test is {early.replace(' other', '')}"
    shift = ShiftSplit(sp, assignment, held, data.batches.copy(), new_normals, groups[new_normals], take)
    return shift, what


def split_table(ed: EvalData, assignment: np.ndarray | None = None) -> dict[str, Any]:
    """Images, patients and images per label of each split, for ``metrics.json`` and the report.

    Args:
        ed: the prepared data.
        assignment: the split to count (default: the patient split).
    """
    assignment = ed.assignment if assignment is None else assignment
    out: dict[str, Any] = {}
    for s in SPLITS:
        m = assignment == s
        names, counts = np.unique(ed.source.labels[m], return_counts=True)
        out[s] = {
            "images": int(m.sum()),
            "patients": len(set(ed.groups[m].tolist())),
            "by_label": {str(n): int(c) for n, c in zip(names, counts, strict=True)},
        }
    return out


def report_rejected(rejected: list[tuple[str, str]]) -> None:
    """One stderr line per file that could not be decoded, even when quiet: nothing is dropped silently."""
    for name, reason in rejected:
        print(f"evaluate: skipped {name}: {reason}", file=sys.stderr, flush=True)
