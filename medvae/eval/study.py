"""Held-out evaluation: anomaly screening, fidelity, synthetic-data utility and privacy, over seeds."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from medvae.anomaly.scoring import SCORES
from medvae.config import IngestConfig, Intensity, LossConfig, ModelConfig, TrainConfig, to_jsonable
from medvae.data.deid import patient_from_name
from medvae.vae.model import ConvVAE

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
_CACHE_FORMAT = "medvae.eval-cache/1"
SPLITS = ("train", "val", "test")

# The anomaly VAE the evaluation trains by default: the shipped default model (see docs/quality.md).
DEFAULT_ANOMALY = TrainConfig(
    model=ModelConfig(latent_dim=128),
    loss=LossConfig(reconstruction="bce", beta=1.0, kl_warmup_epochs=5),
    epochs=30,
    batch_size=64,
    patience=8,
)
# The conditional generator for synthetic training data: the same architecture family, conditioned on
# the normal/abnormal label. Fewer epochs than the anomaly model because it sees ~4x more images per epoch.
DEFAULT_GENERATOR = TrainConfig(
    model=ModelConfig(latent_dim=128, conditional=True, num_classes=2),
    loss=LossConfig(reconstruction="bce", beta=1.0, kl_warmup_epochs=5),
    epochs=20,
    batch_size=64,
    patience=6,
)


class EvaluateConfig(BaseModel):
    """Everything ``medvae evaluate`` does, fixed up front so that a run is reproducible from its config.

    The same patient-grouped split (``split_seed``) is used for every model seed in ``seeds``; only the
    model, generator and classifier seeds vary between repetitions.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="Model seeds; figures are mean ± sd.")
    split_seed: int = Field(0, description="Seed of the patient-grouped train/val/test split (fixed).")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.1, 0.2), description="train/val/test shares of the images, assigned per patient."
    )
    ingest: IngestConfig = Field(
        IngestConfig(),
        description="Decoding of ImageFolder sources (window, aspect, size). Its intensity is not used: "
        "`intensity` below decides, so that an ablation changes one knob.",
    )
    intensity: Intensity = Field(
        "clahe",
        description="Per-image intensity standardisation of every loaded image (the ingest default). A store "
        "whose images were standardised at ingest is never standardised twice.",
    )
    clahe_clip_limit: float = Field(0.01, gt=0, le=1, description="CLAHE clip limit.")
    anomaly: TrainConfig = Field(DEFAULT_ANOMALY, description="The anomaly VAE, trained on normals only.")
    generator: TrainConfig = Field(
        DEFAULT_GENERATOR, description="The conditional VAE that makes synthetic labelled training data."
    )
    primary_score: str = Field("mahalanobis", description="The score whose calibrated threshold is reported.")
    false_positive_rate: float = Field(0.05, gt=0, lt=1, description="Calibration FPR on val normals.")
    label_fractions: tuple[float, ...] = Field(
        (1.0, 0.1), min_length=1, description="Shares of the labelled training images for the utility study."
    )
    synthetic_ratio: float = Field(1.0, gt=0, description="Synthetic images per real training image.")
    classifier_epochs: int = Field(12, ge=1, description="Fixed epochs of the small CNN (see classifier.py).")
    privacy_quantile: float = Field(0.01, ge=0, le=1, description="Near-copy quantile for the filter.")
    utility: bool = Field(True, description="Run the synthetic-data utility and privacy study.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Overrides the training configs' device."
    )
    workers: int = Field(0, ge=0, description="Decoder processes for an ImageFolder; 0: one per core.")
    pictures: int = Field(16, ge=2, description="Images per picture grid.")

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be positive and sum to 1, got {v}")
        return v

    @field_validator("primary_score")
    @classmethod
    def _known_score(cls, v: str) -> str:
        if v not in SCORES:
            raise ValueError(f"primary_score must be one of {SCORES} (a calibrated score), got {v!r}")
        return v

    @field_validator("label_fractions")
    @classmethod
    def _label_fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"label_fractions must lie in (0, 1], got {v}")
        return v


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LabelledImages:
    """A labelled real dataset in memory.

    Attributes:
        images: uint8 (N, H, W).
        labels: the label name of each image, (N,) str.
        groups: the patient (or, without one, the image) each image belongs to, (N,) str.
        names: a per-image identifier (path relative to the source, or the store row id), (N,) str.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    names: np.ndarray


def _limit_threads() -> None:
    # One decoder process per core; multi-threaded BLAS inside each would oversubscribe the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _decode_one(job: tuple[str, str]) -> tuple[np.ndarray | None, str | None]:
    from medvae.data.readers import RejectedInput, decode_file
    from medvae.data.transforms import normalise

    path_s, cfg_json = job
    cfg = IngestConfig.model_validate_json(cfg_json)
    try:
        dec = decode_file(Path(path_s), cfg)
        return normalise(dec[0].pixels, cfg.size, cfg.aspect), None
    except RejectedInput as exc:
        return None, exc.reason
    except Exception as exc:  # one unreadable file must not stop an evaluation of thousands
        return None, f"{type(exc).__name__}: {exc}"


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


def load_image_folder(
    root: Path,
    *,
    ingest_cfg: IngestConfig | None = None,
    workers: int = 0,
) -> tuple[LabelledImages, list[tuple[str, str]]]:
    """Decode and normalise every image of an ImageFolder tree in parallel, exactly as ingest would.

    Each file goes through :func:`medvae.data.readers.decode_file` and
    :func:`medvae.data.transforms.normalise` with ``ingest_cfg``. The patient comes from the file name
    with ``ingest_cfg.patient_regex`` (:func:`medvae.data.deid.patient_from_name`); a file without a
    match is its own group.

    Args:
        root: the folder; labels are parent folder names.
        ingest_cfg: decoding and normalisation settings (defaults: 64×64, pad).
        workers: decoder processes; 0: one per core.

    Returns:
        The images, and ``(relative path, reason)`` for every file that could not be decoded.
    """
    cfg = ingest_cfg or IngestConfig()
    root = Path(root)
    files = list_image_folder(root)
    cfg_json = cfg.model_dump_json()
    jobs = [(str(p), cfg_json) for p, _ in files]
    n_workers = workers or os.cpu_count() or 1
    results: list[tuple[np.ndarray | None, str | None]]
    if n_workers == 1 or len(jobs) < 64:
        results = [_decode_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(n_workers, initializer=_limit_threads) as pool:
            results = list(pool.map(_decode_one, jobs, chunksize=32))
    imgs: list[np.ndarray] = []
    labels: list[str] = []
    groups: list[str] = []
    names: list[str] = []
    rejected: list[tuple[str, str]] = []
    for (path, label), (img, reason) in zip(files, results, strict=True):
        rel = path.relative_to(root).as_posix()
        if img is None:
            rejected.append((rel, reason or "unknown"))
            continue
        imgs.append(img)
        labels.append(label)
        groups.append(patient_from_name(path.name, cfg.patient_regex) or f"image:{rel}")
        names.append(rel)
    size = cfg.size
    data = LabelledImages(
        images=np.stack(imgs) if imgs else np.zeros((0, size, size), np.uint8),
        labels=np.array(labels, dtype=str),
        groups=np.array(groups, dtype=str),
        names=np.array(names, dtype=str),
    )
    return data, rejected


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


def _folder_signature(root: Path, cfg: IngestConfig) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    h.update(str(root.resolve()).encode())
    h.update(cfg.model_dump_json().encode())
    for path, label in list_image_folder(root):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_dataset(
    source: str | Path,
    *,
    store_version: int | None,
    ingest_cfg: IngestConfig,
    workers: int,
    cache_dir: Path | None,
) -> tuple[LabelledImages, dict[str, Any]]:
    """Load a store version or an ImageFolder tree, through an ``.npz`` cache for folders.

    Args:
        source: a store URI (when ``Store(source).exists()``) or an ImageFolder folder.
        store_version: the store version (stores only).
        ingest_cfg: decoding settings for folders.
        workers: decoder processes for folders.
        cache_dir: where decoded folders are cached (keyed by file names, sizes, mtimes and settings).

    Returns:
        The images and a description of the source (kind, counts, rejected files, cache use).

    Raises:
        FileNotFoundError: when the source is neither a store nor a folder.
    """
    from medvae.data.store import Store

    if Store(str(source)).exists():
        data = load_store(str(source), store_version)
        version = Store(str(source)).table(store_version).version()
        info = {"kind": "store", "uri": str(source), "version": version, "rejected": []}
        info["stored_intensity"] = stored_intensity(str(source))
        return data, info
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{source} is neither a medvae store nor an ImageFolder directory")
    sig = _folder_signature(root, ingest_cfg)
    cache = None if cache_dir is None else cache_dir / f"images-{sig[:16]}.npz"
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            data = LabelledImages(z["images"], z["labels"], z["groups"], z["names"])
            rejected = [tuple(r) for r in json.loads(str(z["rejected"]))]
        return data, {"kind": "folder", "path": str(root), "cached": True, "rejected": rejected}
    data, rejected = load_image_folder(root, ingest_cfg=ingest_cfg, workers=workers)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            images=data.images,
            labels=data.labels,
            groups=data.groups,
            names=data.names,
            rejected=np.array(json.dumps(rejected)),
        )
        os.replace(tmp, cache)
    return data, {"kind": "folder", "path": str(root), "cached": False, "rejected": rejected}


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
# Patient-grouped splits
# --------------------------------------------------------------------------------------------------------


def merge_duplicate_groups(images: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Join the groups of pixel-identical images, so that no exact duplicate can straddle two splits.

    Public datasets hold the same radiograph under two names (Kermany: 26 pixel-identical pairs at
    64×64). Treating their patients as one group keeps a test image from having its copy in training.

    Args:
        images: uint8 (N, H, W).
        groups: (N,) group names.

    Returns:
        (N,) group names; every member of a merged group gets the smallest name of the set.
    """
    parent: dict[str, str] = {g: g for g in groups.tolist()}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[bytes, str] = {}
    for img, g in zip(images, groups.tolist(), strict=True):
        key = hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest()
        other = first.setdefault(key, g)
        a, b = find(g), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(g) for g in groups.tolist()], dtype=str)


def _group_hash(salt: str, seed: int, group: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{seed}\0{group}".encode()).digest()[:8], "big")


def _strata(groups: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    # A patient's stratum is its most frequent label (ties: the smallest name), so patients with both
    # normal and abnormal images (possible in NIH) still belong to exactly one stratum.
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for g, lbl in zip(groups.tolist(), labels.tolist(), strict=True):
        counts[g][lbl] += 1
    return {g: min(c, key=lambda k: (-c[k], k)) for g, c in counts.items()}


def patient_split(
    groups: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """A deterministic, label-stratified, patient-grouped train/val/test split.

    Within each stratum (the patients whose majority label is the same), patients are ordered by
    ``sha256(salt, seed, patient)`` and laid end to end by image count; a patient goes to the split in
    whose share of the stratum's images its midpoint falls. Every image of a patient therefore lands in
    one split, the image shares follow ``fractions`` in every class, and the result depends on the seed
    and the patient names only (not on the order of the rows or on any store key).

    Args:
        groups: (N,) patient names.
        labels: (N,) label names.
        fractions: train/val/test shares.
        seed: the split seed.

    Returns:
        (N,) array of ``"train"``, ``"val"`` or ``"test"``.
    """
    groups = np.asarray(groups, dtype=str)
    labels = np.asarray(labels, dtype=str)
    strata = _strata(groups, labels)
    size: dict[str, int] = defaultdict(int)
    for g in groups.tolist():
        size[g] += 1
    cuts = np.cumsum(fractions)[:-1]
    assign: dict[str, str] = {}
    for stratum in sorted(set(strata.values())):
        members = sorted(
            (g for g, s in strata.items() if s == stratum), key=lambda g: (_group_hash("split", seed, g), g)
        )
        total = sum(size[g] for g in members)
        done = 0
        for g in members:
            mid = (done + size[g] / 2.0) / total
            done += size[g]
            assign[g] = SPLITS[int(np.searchsorted(cuts, mid, side="right"))]
    return np.array([assign[g] for g in groups.tolist()], dtype=str)


def grouped_subsample(groups: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A label-stratified, patient-grouped subsample of about ``fraction`` of the images.

    Patients are taken in ``sha256(salt, seed, patient)`` order within each stratum until the stratum's
    share is reached; every stratum keeps at least one patient.

    Args:
        groups: (N,) patient names.
        labels: (N,) label names.
        fraction: in (0, 1]; 1 keeps everything.
        seed: the subsample seed.

    Returns:
        Boolean mask (N,).
    """
    groups = np.asarray(groups, dtype=str)
    if fraction >= 1.0:
        return np.ones(len(groups), dtype=bool)
    strata = _strata(groups, np.asarray(labels, dtype=str))
    size: dict[str, int] = defaultdict(int)
    for g in groups.tolist():
        size[g] += 1
    chosen: set[str] = set()
    for stratum in sorted(set(strata.values())):
        members = sorted(
            (g for g, s in strata.items() if s == stratum),
            key=lambda g: (_group_hash("subsample", seed, g), g),
        )
        target = fraction * sum(size[g] for g in members)
        taken = 0
        for g in members:
            if taken >= target and taken > 0:
                break
            chosen.add(g)
            taken += size[g]
    return np.array([g in chosen for g in groups.tolist()], dtype=bool)


def check_no_leak(groups: np.ndarray, split: np.ndarray) -> None:
    """Raise AssertionError if any patient has images in two different splits."""
    seen: dict[str, str] = {}
    for g, s in zip(np.asarray(groups).tolist(), np.asarray(split).tolist(), strict=True):
        if seen.setdefault(g, s) != s:
            raise AssertionError(f"patient {g!r} appears in both the {seen[g]} and the {s} split")


# --------------------------------------------------------------------------------------------------------
# Metrics and extra scores
# --------------------------------------------------------------------------------------------------------


def binary_metrics(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of a score; abnormal (1) is the positive class.

    Args:
        y_true: (N,) 0/1, both present.
        score: (N,) higher means more abnormal.

    Returns:
        ``{"auroc", "auprc"}``.
    """
    y = np.asarray(y_true).astype(int)
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "n": int(v.size), "values": [float(x) for x in v]}


def fmt_msd(s: dict[str, Any], digits: int = 3) -> str:
    """``mean ± sd`` of a :func:`summarise` result, or ``n/a``."""
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


@torch.no_grad()
def posterior_params(
    model: ConvVAE, images: np.ndarray, *, batch_size: int = 256, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances (float64) of an unconditional VAE, in eval mode.

    Proposed for medvae.anomaly.scoring beside ``posterior_means``.
    """
    from medvae.anomaly.scoring import as_float_batch, eval_mode, model_device

    dev = model_device(model, device)
    mus: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    lvs: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    with eval_mode(model):
        for s in range(0, len(images), batch_size):
            mu, lv = model.encode(as_float_batch(images[s : s + batch_size]).to(dev))
            mus.append(mu.double().cpu().numpy())
            lvs.append(lv.double().cpu().numpy())
    return np.concatenate(mus), np.concatenate(lvs)


def mahalanobis_mu_logvar(
    train_mu: np.ndarray, train_logvar: np.ndarray, mu: np.ndarray, logvar: np.ndarray
) -> np.ndarray:
    """Mahalanobis distance of ``[μ, log σ²]`` from the training normals' Ledoit-Wolf reference.

    The posterior variance says how confidently the encoder places an image; unusual images get unusual
    variances as well as unusual means. Proposed for medvae.anomaly.scoring as a further latent score.
    """
    from medvae.anomaly.scoring import LatentStats, _precision, ledoit_wolf, mahalanobis

    feats_tr = np.concatenate([train_mu, train_logvar], axis=1)
    mean, cov, shrink = ledoit_wolf(feats_tr)
    stats = LatentStats(mean=mean, precision=_precision(cov), shrinkage=shrink, n_images=len(feats_tr))
    return mahalanobis(np.concatenate([mu, logvar], axis=1), stats)


def combined_zscore(
    scores: dict[str, np.ndarray], reference: dict[str, np.ndarray], names: Sequence[str]
) -> np.ndarray:
    """Sum of scores, each z-scored by the mean and sd of the same score on held-out normals.

    Proposed for medvae.anomaly.scoring: a combination that needs no labelled abnormal data.
    """
    total = np.zeros_like(np.asarray(scores[names[0]], dtype=np.float64))
    for n in names:
        ref = np.asarray(reference[n], dtype=np.float64)
        total += (np.asarray(scores[n], dtype=np.float64) - ref.mean()) / (ref.std() + 1e-12)
    return total


def _finite(x: np.ndarray) -> np.ndarray:
    # KL or reconstruction scores of a badly trained model can overflow; AUROC needs finite numbers.
    return np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)


# --------------------------------------------------------------------------------------------------------
# The studies, one seed at a time
# --------------------------------------------------------------------------------------------------------


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def _with_seed_device(cfg: TrainConfig, seed: int, device: str, **model: Any) -> TrainConfig:
    m = cfg.model.model_copy(update=model) if model else cfg.model
    return cfg.model_copy(update={"seed": seed, "device": device, "model": m})


@dataclass(eq=False)
class _Split:
    """Index sets of one evaluation: positions into the loaded arrays."""

    train_normal: np.ndarray
    val_normal: np.ndarray
    test: np.ndarray
    test_y: np.ndarray
    train_all: np.ndarray
    val_all: np.ndarray


def _anomaly_seed(
    x: np.ndarray,
    sp: _Split,
    cfg: EvaluateConfig,
    seed: int,
    device: str,
    pictures_dir: Path | None,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train the anomaly VAE on normal training images, score the test split, measure fidelity."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from medvae.anomaly.scoring import calibrate, screen, to_uint8
    from medvae.engine.trainer import train_vae
    from medvae.synth.generation import interpolation_grid, reconstruction_grid, sample_images, save_grid

    tcfg = _with_seed_device(cfg.anomaly, seed, device, conditional=False, num_classes=0)
    t0 = time.perf_counter()
    res = train_vae(x[sp.train_normal], None, tcfg, val_images=x[sp.val_normal], progress=progress)
    train_s = time.perf_counter() - t0
    model = res.model.eval()
    score_name = cfg.primary_score
    cal = calibrate(
        model,
        x[sp.train_normal],
        x[sp.val_normal],
        score=score_name,
        fpr=cfg.false_positive_rate,
        recon_kind=tcfg.loss.reconstruction,
    )
    test_out = screen(model, x[sp.test], cal)
    val_out = screen(model, x[sp.val_normal], cal)
    scores: dict[str, np.ndarray] = {k: _finite(test_out[k]) for k in SCORES}
    val_scores: dict[str, np.ndarray] = {k: _finite(val_out[k]) for k in SCORES}
    mu_tr, lv_tr = posterior_params(model, x[sp.train_normal])
    mu_te, lv_te = posterior_params(model, x[sp.test])
    mu_va, lv_va = posterior_params(model, x[sp.val_normal])
    scores["mahalanobis_mu_logvar"] = mahalanobis_mu_logvar(mu_tr, lv_tr, mu_te, lv_te)
    val_scores["mahalanobis_mu_logvar"] = mahalanobis_mu_logvar(mu_tr, lv_tr, mu_va, lv_va)
    combo = ("mahalanobis", "recon")
    scores["combined_z"] = combined_zscore(scores, val_scores, combo)
    y = sp.test_y
    flags = np.asarray(test_out["flag"], dtype=bool)
    out: dict[str, Any] = {
        "seed": seed,
        "scores": {k: binary_metrics(y, v) for k, v in scores.items()},
        "primary_score": score_name,
        "threshold": float(cal.threshold),
        "sensitivity": float(flags[y == 1].mean()) if (y == 1).any() else None,
        "specificity": float(1.0 - flags[y == 0].mean()) if (y == 0).any() else None,
        "val_fpr": float((val_out["score"] > cal.threshold).mean()),
        "n_train_normal": len(sp.train_normal),
        "n_val_normal": len(sp.val_normal),
        "n_test_normal": int((y == 0).sum()),
        "n_test_abnormal": int((y == 1).sum()),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "stopped_early": res.stopped_early,
        "device": res.device,
        "train_seconds": train_s,
    }
    curves = {k: np.stack(roc_curve(y, v)[:2]) for k, v in scores.items()}

    # Fidelity: reconstructions of held-out normals from the posterior mean.
    normals = x[sp.test[y == 0]]
    with torch.no_grad():
        from medvae.anomaly.scoring import as_float_batch, eval_mode

        dev = next(model.parameters()).device
        recs: list[np.ndarray] = []
        with eval_mode(model):
            for s in range(0, len(normals), 256):
                recs.append(to_uint8(model(as_float_batch(normals[s : s + 256]).to(dev)).recon))
    rec = np.concatenate(recs) if recs else np.zeros_like(normals)
    ssim = [structural_similarity(a, b, data_range=255) for a, b in zip(normals, rec, strict=True)]
    psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(normals, rec, strict=True)]
    out["fidelity"] = {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr)), "n": len(normals)}

    if pictures_dir is not None:
        k = cfg.pictures
        abn = x[sp.test[y == 1]]
        reconstruction_grid(model, normals[:k], pictures_dir / "reconstructions_normal.png", n=k)
        if len(abn):
            reconstruction_grid(model, abn[:k], pictures_dir / "reconstructions_abnormal.png", n=k)
        save_grid(sample_images(model, k * 2, seed=seed), pictures_dir / "samples_anomaly_vae.png")
        pairs = min(4, len(normals) // 2)
        if pairs >= 1:
            interpolation_grid(
                model, normals[:pairs], normals[pairs : 2 * pairs], pictures_dir / "interpolation.png"
            )
        if len(abn):
            interpolation_grid(
                model, normals[:1], abn[:1], pictures_dir / "interpolation_normal_to_abnormal.png"
            )
    _log(
        progress,
        f"seed {seed} anomaly: {score_name} AUROC {out['scores'][score_name]['auroc']:.3f}, "
        f"recon AUROC {out['scores']['recon']['auroc']:.3f}, SSIM {out['fidelity']['ssim']:.3f} "
        f"({train_s:.0f} s training on {res.device})",
    )
    out["_scores"] = scores  # raw test scores for the figures; removed before writing JSON
    return out, curves


def _utility_seed(
    x: np.ndarray,
    y01: np.ndarray,
    groups: np.ndarray,
    labels: np.ndarray,
    sp: _Split,
    cfg: EvaluateConfig,
    seed: int,
    device: str,
    pictures_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """Real-only, real + synthetic and synthetic-only classifiers at each label fraction, and privacy."""
    from medvae.engine.trainer import train_vae
    from medvae.eval.classifier import predict_proba, train_classifier
    from medvae.synth.generation import (
        nearest_neighbour_distances,
        privacy_filter,
        privacy_threshold,
        sample_images,
        save_grid,
    )

    test_idx = sp.test
    y_test = y01[test_idx]
    out: dict[str, Any] = {"seed": seed, "fractions": {}}
    for fi, frac in enumerate(cfg.label_fractions):
        # The subsample is part of the split (fixed by split_seed), not of the model seed.
        sub = grouped_subsample(groups[sp.train_all], labels[sp.train_all], frac, cfg.split_seed)
        tr = sp.train_all[sub]
        x_tr, y_tr = x[tr], y01[tr]
        t0 = time.perf_counter()
        gcfg = _with_seed_device(cfg.generator, seed, device, conditional=True, num_classes=2)
        gen = train_vae(
            x_tr, y_tr, gcfg, val_images=x[sp.val_all], val_labels=y01[sp.val_all], progress=progress
        ).model.eval()
        gen_s = time.perf_counter() - t0
        synth: list[np.ndarray] = []
        synth_y: list[np.ndarray] = []
        for c in (0, 1):
            n_c = round(cfg.synthetic_ratio * int((y_tr == c).sum()))
            if n_c > 0:
                synth.append(sample_images(gen, n_c, label_index=c, seed=seed * 1000 + fi * 10 + c))
                synth_y.append(np.full(n_c, c, dtype=np.int64))
        xs = np.concatenate(synth)
        ys = np.concatenate(synth_y)
        # Privacy: distance to the closest record (DCR) of the generator's own training images.
        d_syn = nearest_neighbour_distances(xs, x_tr)
        d_val = nearest_neighbour_distances(x[sp.val_all], x_tr)
        d_test = nearest_neighbour_distances(x[test_idx], x_tr)
        q = cfg.privacy_quantile
        reference = float(np.quantile(d_test, q))  # the criterion: held-out test real → train
        # The filter never sees the test split: the stricter of the pipeline's train-to-train quantile
        # and the same quantile of (held-out) val → train distances.
        thr_train = privacy_threshold(x_tr, q, seed=seed)
        thr = max(thr_train, float(np.quantile(d_val, q)))
        filt = privacy_filter(xs, x_tr, thr)
        keep = filt.keep
        xk, yk = xs[keep], ys[keep]
        privacy = {
            "reference_test_q": reference,
            "filter_threshold": thr,
            "threshold_train_to_train": thr_train,
            "near_copy_share_before": float((d_syn < reference).mean()),
            "near_copy_share_after": float((d_syn[keep] < reference).mean()) if keep.any() else 0.0,
            "rejection_rate": filt.rejection_rate,
            "dcr_synthetic_median": float(np.median(d_syn)),
            "dcr_heldout_median": float(np.median(d_test)),
            "dcr_synthetic_min_after": float(d_syn[keep].min()) if keep.any() else None,
            "n_synthetic": len(xs),
            "n_kept": int(keep.sum()),
        }
        # Fixed classifier, three training sets, one real validation and test set.
        t1 = time.perf_counter()
        aurocs: dict[str, float | None] = {}
        x_val, y_val = x[sp.val_all], y01[sp.val_all]
        sets = {
            "real": (x_tr, y_tr),
            "real_synthetic": (np.concatenate([x_tr, xk]), np.concatenate([y_tr, yk])),
            "synthetic": (xk, yk),
        }
        for name, (xa, ya) in sets.items():
            if len(np.unique(ya)) < 2:
                aurocs[name] = None
                continue
            clf = train_classifier(
                xa, ya, x_val, y_val, seed=seed, epochs=cfg.classifier_epochs, device=device
            )
            aurocs[name] = float(roc_auc_score(y_test, predict_proba(clf, x[test_idx])[:, 1]))
        clf_s = time.perf_counter() - t1
        key = f"{frac:g}"
        out["fractions"][key] = {
            "n_real_train": len(tr),
            "n_real_patients": len(set(groups[tr].tolist())),
            "auroc": aurocs,
            "privacy": privacy,
            "generator_seconds": gen_s,
            "classifier_seconds": clf_s,
            "_dcr": {"synthetic": d_syn, "heldout": d_test, "kept": keep},
        }
        if pictures_dir is not None and fi == 0:
            k = cfg.pictures
            for c, cname in ((0, "normal"), (1, "abnormal")):
                sel = xs[ys == c][:k]
                if len(sel):
                    save_grid(sel, pictures_dir / f"samples_cvae_{cname}.png")
        _log(
            progress,
            f"seed {seed} utility @ {frac:g}: real {aurocs['real']}, real+syn {aurocs['real_synthetic']}, "
            f"syn {aurocs['synthetic']}; near copies {privacy['near_copy_share_before']:.3f} → "
            f"{privacy['near_copy_share_after']:.3f} ({gen_s:.0f} s generator, {clf_s:.0f} s classifiers)",
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Figures and the report
# --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: list[dict[str, np.ndarray]], summary: dict[str, Any], path: Path) -> Path:
    """ROC curves of every score, one thin line per seed, the legend giving AUROC mean ± sd."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(curves[0]):
        c = colours[i % len(colours)]
        for j, cur in enumerate(curves):
            label = f"{name}: {fmt_msd(summary[name]['auroc'])}" if j == 0 else None
            ax.plot(cur[name][0], cur[name][1], color=c, lw=1.2, alpha=0.8, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate (normals flagged)")
    ax.set_ylabel("sensitivity (abnormals flagged)")
    ax.set_title(f"Anomaly scores on the test split ({len(curves)} seeds, AUROC mean ± sd)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_score_hist(scores: np.ndarray, y: np.ndarray, threshold: float, name: str, path: Path) -> Path:
    """Histogram of one score for normal and abnormal test images, with the calibrated threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[y == 0], bins=bins, alpha=0.6, density=True, label="normal")
    ax.hist(scores[y == 1], bins=bins, alpha=0.6, density=True, label="abnormal")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="calibrated threshold")
    ax.set_xlabel(name)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dcr(dcr: list[dict[str, np.ndarray]], reference: list[float], title: str, path: Path) -> Path:
    """Distance-to-closest-record histograms: synthetic→train (before/after the filter), held-out→train."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    syn = np.concatenate([d["synthetic"] for d in dcr])
    kept = np.concatenate([d["synthetic"][d["kept"]] for d in dcr])
    held = np.concatenate([d["heldout"] for d in dcr])
    bins = np.histogram_bin_edges(np.concatenate([syn, held]), bins=50)
    ax.hist(held, bins=bins, alpha=0.5, density=True, label="held-out real → train")
    ax.hist(syn, bins=bins, alpha=0.5, density=True, label="synthetic → train (all)")
    ax.hist(kept, bins=bins, histtype="step", lw=1.5, density=True, label="synthetic → train (kept)")
    for r in reference:
        ax.axvline(r, color="k", ls=":", lw=1)
    ax.set_xlabel("RMS distance to the nearest training image (0..1 grey levels)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_utility(summary: dict[str, Any], path: Path) -> Path:
    """Test AUROC of the fixed classifier by training set and label fraction (mean ± sd over seeds)."""
    plt = _pyplot()
    fracs = list(summary)
    kinds = ("real", "real_synthetic", "synthetic")
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [summary[f][kind]["mean"] or 0.0 for f in fracs]
        sds = [summary[f][kind]["sd"] or 0.0 for f in fracs]
        pos = np.arange(len(fracs)) + (i - 1) * width
        ax.bar(pos, means, width, yerr=sds, capsize=3, label=kind.replace("_", " + "))
    ax.set_xticks(np.arange(len(fracs)), [f"{float(f):.0%} of labels" for f in fracs])
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("test AUROC (real test images)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(metrics: dict[str, Any], figures: list[tuple[Path, str]], path: Path) -> Path:
    """A self-contained HTML report: the headline tables and every figure embedded as a PNG data URI."""
    an = metrics["anomaly"]["summary"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medvae evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse;"
        "margin:8px 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "figure{display:inline-block;margin:8px}img{max-width:480px;image-rendering:pixelated}</style>",
        "</head><body><h1>medvae evaluation</h1>",
        f"<p>Source {html.escape(str(metrics['source']))}; normal label "
        f"<b>{html.escape(metrics['normal_label'])}</b>; seeds {metrics['config']['seeds']} (figures are "
        "mean ± sd over seeds, one fixed patient-grouped split, split seed "
        f"{metrics['config']['split_seed']}); "
        f"wall time {metrics['timing']['total_seconds']:.0f} s on {html.escape(metrics['device'])}.</p>",
        "<h2>Data and split</h2>",
        _table(
            ["split", "images", "patients", *metrics["data"]["label_names"]],
            [
                [
                    s,
                    v["images"],
                    v["patients"],
                    *[v["by_label"].get(n, 0) for n in metrics["data"]["label_names"]],
                ]
                for s, v in metrics["data"]["splits"].items()
            ],
        ),
        f"<p>Patients in more than one split: {metrics['data']['patients_crossing_splits']}.</p>",
        "<h2>Anomaly screening (trained on normal training images only)</h2>",
        _table(
            ["score", "AUROC", "AUPRC"],
            [[k, fmt_msd(v["auroc"]), fmt_msd(v["auprc"])] for k, v in an["scores"].items()],
        ),
        f"<p>Primary score <b>{html.escape(an['primary_score'])}</b> at the threshold calibrated on held-out "
        f"val normals (target FPR {metrics['config']['false_positive_rate']}): sensitivity "
        f"{fmt_msd(an['sensitivity'])}, specificity {fmt_msd(an['specificity'])}.</p>",
        "<h2>Fidelity (held-out normal test images)</h2>",
        _table(["SSIM", "PSNR (dB)"], [[fmt_msd(an["ssim"]), fmt_msd(an["psnr"], 2)]]),
    ]
    if metrics.get("utility"):
        us = metrics["utility"]["summary"]
        parts += [
            "<h2>Synthetic-data utility (fixed small CNN, test AUROC on real test images)</h2>",
            _table(
                ["labels", "real", "real + synthetic", "synthetic only (TSTR)", "TSTR / real"],
                [
                    [
                        f"{float(f):.0%}",
                        fmt_msd(v["real"]),
                        fmt_msd(v["real_synthetic"]),
                        fmt_msd(v["synthetic"]),
                        fmt_msd(v["tstr_ratio"]),
                    ]
                    for f, v in us.items()
                ],
            ),
            "<h2>Privacy (distance to the closest training record)</h2>",
            _table(
                ["labels", "near copies before filter", "after filter", "rejected", "reference (test q)"],
                [
                    [
                        f"{float(f):.0%}",
                        fmt_msd(v["near_copy_share_before"]),
                        fmt_msd(v["near_copy_share_after"]),
                        fmt_msd(v["rejection_rate"]),
                        fmt_msd(v["reference_test_q"], 4),
                    ]
                    for f, v in metrics["privacy"]["summary"].items()
                ],
            ),
        ]
    parts.append("<h2>Figures</h2>")
    parts += [_img_tag(p, c) for p, c in figures if p.exists()]
    parts.append("<h2>Targets</h2>")
    parts.append(_table(["target", "met"], [[k, v] for k, v in metrics["targets"].items()]))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline figures of a :func:`evaluate` result as plain text lines (for the CLI and scripts).

    Args:
        metrics: the dict returned by :func:`evaluate` (or read back from ``metrics.json``).

    Returns:
        Lines without trailing newlines: the split, anomaly AUROC/AUPRC of every score, sensitivity and
        specificity at the calibrated threshold, fidelity, and, when run, utility, privacy and the targets.
    """
    an = metrics["anomaly"]["summary"]
    sp = metrics["data"]["splits"]
    lines = [
        f"seeds {metrics['config']['seeds']} on {metrics['device']}; split (images/patients): "
        + ", ".join(f"{k} {v['images']}/{v['patients']}" for k, v in sp.items()),
        "anomaly AUROC | AUPRC (mean ± sd), normal vs abnormal on the test split:",
    ]
    lines += [f"  {k:24s} {fmt_msd(v['auroc'])} | {fmt_msd(v['auprc'])}" for k, v in an["scores"].items()]
    lines.append(
        f"primary {an['primary_score']} at the calibrated threshold: sensitivity "
        f"{fmt_msd(an['sensitivity'])}, specificity {fmt_msd(an['specificity'])}"
    )
    lines.append(
        f"fidelity on held-out normals: SSIM {fmt_msd(an['ssim'])}, PSNR {fmt_msd(an['psnr'], 2)} dB"
    )
    if "utility" in metrics:
        lines.append("utility, fixed CNN test AUROC (real | real+synthetic | synthetic only | TSTR/real):")
        for f, v in metrics["utility"]["summary"].items():
            lines.append(
                f"  {float(f):4.0%} labels: {fmt_msd(v['real'])} | {fmt_msd(v['real_synthetic'])} | "
                f"{fmt_msd(v['synthetic'])} | {fmt_msd(v['tstr_ratio'])}"
            )
        lines.append("privacy, share of synthetic near copies before -> after the filter (rejected):")
        for f, v in metrics["privacy"]["summary"].items():
            lines.append(
                f"  {float(f):4.0%} labels: {fmt_msd(v['near_copy_share_before'])} -> "
                f"{fmt_msd(v['near_copy_share_after'])} ({fmt_msd(v['rejection_rate'])})"
            )
    lines += [
        f"target {'met' if ok else 'NOT met' if ok is False else 'n/a'}: {k}"
        for k, ok in metrics["targets"].items()
    ]
    return lines


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _split_table(sp_names: np.ndarray, groups: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SPLITS:
        m = sp_names == s
        names, counts = np.unique(labels[m], return_counts=True)
        out[s] = {
            "images": int(m.sum()),
            "patients": len(set(groups[m].tolist())),
            "by_label": {str(n): int(c) for n, c in zip(names, counts, strict=True)},
        }
    return out


def evaluate(
    source: str | Path,
    out_dir: Path,
    *,
    normal_label: str,
    cfg: EvaluateConfig,
    store_version: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the VAE on a labelled real dataset and write ``metrics.json`` and ``report.html``.

    On one deterministic patient-grouped train/val/test split (``cfg.split_seed``), repeated for every
    model seed in ``cfg.seeds``:

    * **Anomaly screening**: an unconditional VAE trained on the normal training images only (its val
      normals for early stopping and threshold calibration) scores the test split; AUROC and AUPRC of
      every score, ROC curves, and sensitivity/specificity at the calibrated threshold.
    * **Fidelity**: SSIM and PSNR of posterior-mean reconstructions of the normal test images; picture
      grids of real, reconstructed, sampled and interpolated images (first seed).
    * **Utility**: a conditional VAE trained on the labelled training images (all, and a patient-grouped
      fraction) makes synthetic images; the fixed :mod:`medvae.eval.classifier` CNN is trained on real,
      real + synthetic and synthetic only, and tested on the real test split.
    * **Privacy**: nearest-neighbour distances of synthetic and of held-out real images to the training
      images, and the share of near copies before and after the privacy filter.

    Args:
        source: a store URI (used when ``Store(source).exists()``) or an ImageFolder directory.
        out_dir: where metrics.json, report.html, the PNGs and the decoded-image cache go.
        normal_label: the label of normal images; every other label counts as abnormal (positive).
        cfg: the evaluation settings.
        store_version: the store version to read (stores only); latest when None.
        progress: log one line per stage (and training progress bars) to stderr.

    Returns:
        The metrics dict, as written to ``metrics.json``.

    Raises:
        ValueError: when the normal label is missing, there is no abnormal image, or a split is empty.
        FileNotFoundError: when the source is neither a store nor a folder.
    """
    from medvae.engine.device import select_device

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = out_dir / "pictures"
    timing: dict[str, float] = {}

    data, source_info = load_dataset(
        source,
        store_version=store_version,
        ingest_cfg=cfg.ingest,
        workers=cfg.workers,
        cache_dir=out_dir / "cache",
    )
    timing["load_seconds"] = time.perf_counter() - t_start
    label_names = sorted(set(data.labels.tolist()))
    if normal_label not in label_names:
        raise ValueError(f"normal label {normal_label!r} not among the labels {label_names}")
    if len(label_names) < 2:
        raise ValueError(f"only the label {normal_label!r} is present: anomaly metrics need abnormal images")
    _log(progress, f"loaded {len(data.images)} images ({source_info['kind']}), labels {label_names}")

    # A store ingested with a standardisation already holds standardised pixels: never apply it twice.
    already = source_info.get("stored_intensity", "none")
    applied: Intensity = cfg.intensity if already == "none" else "none"
    x = standardise_intensity(data.images, applied, cfg.clahe_clip_limit)
    y01 = (data.labels != normal_label).astype(np.int64)
    groups = merge_duplicate_groups(data.images, data.groups)
    split = patient_split(groups, y01.astype(str), cfg.split_fractions, cfg.split_seed)
    check_no_leak(groups, split)
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    sp = _Split(
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
    device = select_device(cfg.device).type

    anomaly_runs: list[dict[str, Any]] = []
    curves: list[dict[str, np.ndarray]] = []
    t0 = time.perf_counter()
    for i, seed in enumerate(cfg.seeds):
        run, cur = _anomaly_seed(x, sp, cfg, seed, device, pictures if i == 0 else None, progress)
        anomaly_runs.append(run)
        curves.append(cur)
    timing["anomaly_seconds"] = time.perf_counter() - t0

    score_names = list(anomaly_runs[0]["scores"])
    primary = anomaly_runs[0]["primary_score"]
    an_summary: dict[str, Any] = {
        "primary_score": primary,
        "scores": {
            k: {
                "auroc": summarise([r["scores"][k]["auroc"] for r in anomaly_runs]),
                "auprc": summarise([r["scores"][k]["auprc"] for r in anomaly_runs]),
            }
            for k in score_names
        },
        "sensitivity": summarise([r["sensitivity"] for r in anomaly_runs]),
        "specificity": summarise([r["specificity"] for r in anomaly_runs]),
        "val_fpr": summarise([r["val_fpr"] for r in anomaly_runs]),
        "ssim": summarise([r["fidelity"]["ssim"] for r in anomaly_runs]),
        "psnr": summarise([r["fidelity"]["psnr"] for r in anomaly_runs]),
    }
    figures: list[tuple[Path, str]] = []
    figures.append(
        (plot_roc(curves, an_summary["scores"], pictures / "roc.png"), "ROC curves of every anomaly score")
    )
    first = anomaly_runs[0]
    figures.append(
        (
            plot_score_hist(
                first["_scores"][primary], sp.test_y, first["threshold"], primary, pictures / "score_hist.png"
            ),
            f"{primary} on the test split, first seed",
        )
    )

    utility_runs: list[dict[str, Any]] = []
    if cfg.utility:
        t0 = time.perf_counter()
        for i, seed in enumerate(cfg.seeds):
            utility_runs.append(
                _utility_seed(
                    x,
                    y01,
                    groups,
                    y01.astype(str),
                    sp,
                    cfg,
                    seed,
                    device,
                    pictures if i == 0 else None,
                    progress,
                )
            )
        timing["utility_seconds"] = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "source": str(source),
        "source_info": {k: v for k, v in source_info.items() if k != "rejected"},
        "normal_label": normal_label,
        "device": device,
        "intensity": {"at_ingest": already, "applied_here": applied},
        "config": to_jsonable(cfg),
        "data": {
            "n_images": len(x),
            "label_names": label_names,
            "rejected_files": len(source_info.get("rejected", [])),
            "splits": _split_table(split, groups, data.labels),
            "patients_crossing_splits": 0,  # check_no_leak above raised otherwise
        },
        "anomaly": {"per_seed": anomaly_runs, "summary": an_summary},
    }
    targets: dict[str, bool | None] = {
        f"primary latent score AUROC >= 0.85 ({primary})": bool(
            an_summary["scores"][primary]["auroc"]["mean"] >= 0.85
        ),
    }
    if utility_runs:
        fr_keys = list(utility_runs[0]["fractions"])
        u_summary: dict[str, Any] = {}
        p_summary: dict[str, Any] = {}
        for f in fr_keys:
            runs = [u["fractions"][f] for u in utility_runs]
            real = summarise([r["auroc"]["real"] for r in runs])
            both = summarise([r["auroc"]["real_synthetic"] for r in runs])
            syn = summarise([r["auroc"]["synthetic"] for r in runs])
            ratio = summarise(
                [
                    r["auroc"]["synthetic"] / r["auroc"]["real"]
                    for r in runs
                    if r["auroc"]["synthetic"] is not None and r["auroc"]["real"]
                ]
            )
            u_summary[f] = {"real": real, "real_synthetic": both, "synthetic": syn, "tstr_ratio": ratio}
            p_summary[f] = {
                k: summarise([r["privacy"][k] for r in runs])
                for k in (
                    "near_copy_share_before",
                    "near_copy_share_after",
                    "rejection_rate",
                    "reference_test_q",
                    "filter_threshold",
                    "dcr_synthetic_median",
                    "dcr_heldout_median",
                )
            }
            title = f"{float(f):.0%} of labels: DCR over {len(runs)} seeds (dotted: test 1st percentile)"
            figures.append(
                (
                    plot_dcr(
                        [r["_dcr"] for r in runs],
                        [r["privacy"]["reference_test_q"] for r in runs],
                        title,
                        pictures / f"dcr_{f}.png",
                    ),
                    title,
                )
            )
        figures.append((plot_utility(u_summary, pictures / "utility.png"), "Fixed-CNN test AUROC"))
        metrics["utility"] = {"per_seed": utility_runs, "summary": u_summary}
        metrics["privacy"] = {"summary": p_summary}
        small = min(fr_keys, key=float)
        us = u_summary[small]
        if us["real"]["mean"] is not None and us["real_synthetic"]["mean"] is not None:
            targets[f"real+synthetic >= real at {float(small):.0%} labels"] = bool(
                us["real_synthetic"]["mean"] >= us["real"]["mean"]
            )
        for f in fr_keys:
            r = u_summary[f]
            if r["real"]["mean"] and r["synthetic"]["mean"] is not None:
                targets[f"TSTR >= 0.9 x real at {float(f):.0%} labels"] = bool(
                    r["synthetic"]["mean"] >= 0.9 * r["real"]["mean"]
                )
            targets[
                f"no kept synthetic image nearer than the test 1st percentile at {float(f):.0%} labels"
            ] = bool(all(u["fractions"][f]["privacy"]["near_copy_share_after"] == 0.0 for u in utility_runs))
    for name, caption in (
        ("reconstructions_normal.png", "Held-out normals (odd rows) and their reconstructions (first seed)"),
        ("reconstructions_abnormal.png", "Held-out abnormals and their reconstructions (first seed)"),
        ("samples_anomaly_vae.png", "Samples of the anomaly VAE (first seed)"),
        ("interpolation.png", "Latent interpolations between held-out normals (first seed)"),
        ("interpolation_normal_to_abnormal.png", "Latent interpolation normal → abnormal (first seed)"),
        ("samples_cvae_normal.png", "Conditional VAE samples, normal (100% labels, first seed, unfiltered)"),
        (
            "samples_cvae_abnormal.png",
            "Conditional VAE samples, abnormal (100% labels, first seed, unfiltered)",
        ),
    ):
        figures.append((pictures / name, caption))
    timing["total_seconds"] = time.perf_counter() - t_start
    metrics["targets"] = targets
    metrics["timing"] = timing
    metrics = _jsonable(metrics)
    tmp = out_dir / f".metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / "metrics.json")
    write_report(metrics, figures, out_dir / "report.html")
    _log(
        progress,
        f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'} in {timing['total_seconds']:.0f} s",
    )
    return metrics
