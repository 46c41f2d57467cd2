"""The augment job: synthetic images from a model, privacy-filtered, committed as one new store version."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from medvae.config import AugmentConfig, to_jsonable
from medvae.data.deid import keyed_hash
from medvae.data.store import Store, empty_rows, images_from, lineage, to_arrow
from medvae.jobs.results import AugmentResult

if TYPE_CHECKING:  # torch-free at import: flows/augment.py imports this module when Prefect loads it
    from medvae.synth.sample import Sampling


@dataclass(frozen=True)
class Draw:
    """One label's share of an augment call.

    Attributes:
        label: the label the rows get (None: unlabelled).
        label_index: the class index to condition on (conditional models), else None.
        count: images to sample.
        seed: the sampling seed, derived from the call's seed and the label, so two labels never share
            latent draws or row ids.
    """

    label: str | None
    label_index: int | None
    count: int
    seed: int


def label_seed(seed: int, label: str | None) -> int:
    """A sampling seed for ``(seed, label)``: stable across runs, distinct for distinct labels."""
    digest = hashlib.sha256(f"medvae-augment\0{seed}\0{label or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit a signed 64-bit integer


def synthetic_id(model_hash: str, draw: Draw, k: int, recipe: str) -> str:
    """The row id of draw ``k`` of a label's draws: the same model, recipe, seed, label and index give the
    same id.

    A repeated augment with the same settings therefore adds nothing new (and says so), while another
    label, seed or sampling recipe (:func:`recipe`: other pixels) can never reuse an id.
    """
    data = f"{recipe}\0{draw.seed}\0{draw.label or ''}\0{k}".encode()
    return "syn-" + keyed_hash(model_hash.encode(), "synthetic", data)[:28]


def recipe(cfg: AugmentConfig) -> str:
    """What besides the model, seed and label decides a sample's pixels: the sampler, its temperature and
    whether detail is restored."""
    temperature = f"{cfg.temperature:g}" if cfg.sampler == "gmm" else "-"
    return f"{cfg.sampler}\0{temperature}\0{'detail' if cfg.restore_detail else 'decoded'}"


def plan_draws(label_names: list[str], conditional: bool, cfg: AugmentConfig) -> list[Draw]:
    """How many images to draw for which label.

    A conditional model samples the requested label, or splits ``count`` over all its labels. An
    unconditional model samples what it was trained on, so it may carry a label only when its training
    rows had exactly that one label.

    Raises:
        ValueError: for a label the model was not trained on.
    """
    if conditional:
        wanted = [cfg.label] if cfg.label else label_names
        unknown = [w for w in wanted if w not in label_names]
        if unknown:
            raise ValueError(f"label {unknown[0]!r} is not one the model knows: {label_names}")
        return [
            Draw(w, label_names.index(w), cfg.count // len(wanted) + (i < cfg.count % len(wanted)), 0)
            for i, w in enumerate(wanted)
        ]
    only = label_names[0] if len(label_names) == 1 else None
    if cfg.label is not None and cfg.label != only:
        trained = f"only {only!r}" if only else f"mixed labels {label_names} without conditioning"
        raise ValueError(
            f"this unconditional model was trained on {trained}, so its samples cannot be labelled "
            f"{cfg.label!r}; train with --conditional to sample per label"
        )
    return [Draw(only, None, cfg.count, 0)]


def _with_seeds(draws: list[Draw], seed: int) -> list[Draw]:
    return [Draw(d.label, d.label_index, d.count, label_seed(seed, d.label)) for d in draws]


def generate_synthetic(model_dir: Path, store_uri: str, cfg: AugmentConfig) -> tuple[pa.Table, AugmentResult]:
    """Sample synthetic images, drop those too close to a training image, and build their store rows.

    Returns:
        The rows to commit (origin synthetic, label, model hash, seed) and the privacy-filter figures.
    """
    from medvae.synth.privacy import privacy_threshold
    from medvae.vae.artifacts import load_model, store_key

    # The signature is checked when the store has a key (a store that has none fails below anyway).
    loaded = load_model(model_dir, key=store_key(store_uri))
    draws = _with_seeds(plan_draws(loaded.label_names, loaded.cfg.model.conditional, cfg), cfg.seed)
    how = _sampling(model_dir, cfg)
    train = _privacy_reference(loaded.meta.get("dataset", {}), store_uri)
    threshold = privacy_threshold(train, cfg.privacy_quantile)
    rows = empty_rows()
    kept: Counter[str] = Counter()
    requested = drawn = 0
    for draw in draws:
        if draw.count <= 0:
            continue
        images, ks, n_drawn = _draw_until_kept(loaded.model, draw, how, train, threshold, cfg.max_draws)
        for image, k in zip(images, ks, strict=True):
            _append_row(rows, image, synthetic_id(loaded.hash, draw, k, recipe(cfg)), draw, loaded.hash)
        requested, drawn = requested + draw.count, drawn + n_drawn
        kept[draw.label or ""] += len(ks)
    total = sum(kept.values())
    result = AugmentResult(
        requested=requested,
        kept=total,
        rejected=drawn - total,
        drawn=drawn,
        privacy_threshold=float(threshold),
        model_hash=loaded.hash,
        per_label=dict(kept),
    )
    return to_arrow(rows), result


def _draw_until_kept(
    model: Any, draw: Draw, how: Sampling, train: np.ndarray, threshold: float, max_draws: float
) -> tuple[list[np.ndarray], list[int], int]:
    """``draw.count`` samples that pass the privacy filter (:func:`~medvae.synth.sample.sample_private`).

    Returns:
        The kept images, their indices in the label's sample sequence (for the row ids), and how many
        samples were read.
    """
    from medvae.synth.sample import sample_private

    got = sample_private(
        model,
        draw.count,
        label_index=draw.label_index,
        seed=draw.seed,
        train=train,
        threshold=threshold,
        max_draws=max_draws,
        sampler=how.sampler,
        detail=how.detail,
    )
    ks = np.flatnonzero(got.keep)
    return [got.images[k] for k in ks], [int(k) for k in ks], got.read


def _sampling(model_dir: Path, cfg: AugmentConfig) -> Sampling:
    """The model's latent mixture at the configured temperature and its fitted detail restoration.

    Raises:
        ValueError: when the mixture or the restoration is asked for but the model directory has none
            (it was trained by an older medvae).
    """
    from medvae.synth.detail import load_detail
    from medvae.synth.latent import load_sampler
    from medvae.synth.sample import Sampling

    sampler = detail = None
    if cfg.sampler == "gmm":
        sampler = load_sampler(model_dir)
        if sampler is None:
            raise ValueError(
                f"{model_dir} has no latent sampler (it was trained by an older medvae): retrain it, or "
                "sample from the prior with --set sampler=prior"
            )
        sampler = sampler.with_temperature(cfg.temperature)
    if cfg.restore_detail:
        detail = load_detail(model_dir)
        if detail is None:
            raise ValueError(
                f"{model_dir} has no detail restoration (it was trained by an older medvae): retrain it, or "
                "keep the decoder's blurry output with --set restore_detail=false"
            )
    return Sampling(sampler, detail)


def _privacy_reference(dataset: dict[str, Any], store_uri: str) -> np.ndarray:
    # Every real row matching the training filter: a superset of what the model saw (its val and test
    # rows too), which only makes the filter stricter.
    store = Store(dataset.get("store", store_uri))
    return images_from(store.read(dataset.get("version"), where=dataset.get("where") or None))


def _append_row(rows: dict[str, list[Any]], image: np.ndarray, rid: str, draw: Draw, model_hash: str) -> None:
    values = {
        "id": rid,
        "height": image.shape[0],
        "width": image.shape[1],
        "pixels": image.tobytes(),
        "label": draw.label,
        "origin": "synthetic",
        "model_hash": model_hash,
        "seed": draw.seed,
        "split": "train",
    }
    for name, column in rows.items():
        column.append(values.get(name))


def augment_job(model_dir: Path, store_uri: str, cfg: AugmentConfig) -> AugmentResult:
    """Generate synthetic images, commit the kept ones as one new store version, then write DICOMs.

    Rows whose ids are already in the store (an earlier augment with the same model, seed and label)
    are not added twice; the result says how many were added and how many were already there. DICOM
    files are written only after the commit succeeded, named by row id.
    """
    from dataclasses import replace

    rows, result = generate_synthetic(model_dir, store_uri, cfg)
    store = Store(store_uri)
    present = store.ids("id") & set(rows.column("id").to_pylist()) if rows.num_rows else set()
    meta = lineage("augment", to_jsonable(cfg), model_hash=result.model_hash, privacy=result.to_dict())
    # The DICOM set is staged first and published only once the rows are committed: a crash leaves
    # either no visible files or files whose rows are in the store, never files without rows.
    staged = (
        _stage_dicoms(rows, cfg, result.model_hash) if cfg.write_dicom is not None and rows.num_rows else None
    )
    try:
        version = store.insert_new(rows, meta)
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    result = replace(
        result, version=version, rows_added=rows.num_rows - len(present), already_present=len(present)
    )
    if staged is not None:
        paths = staged.publish()
        result = replace(result, dicom_dir=str(paths[0].parent) if paths else None, dicom_files=len(paths))
    return result


def _stage_dicoms(rows: pa.Table, cfg: AugmentConfig, model_hash: str) -> Any:
    from medvae.synth.dicom import stage_synthetic_dicom

    assert cfg.write_dicom is not None
    return stage_synthetic_dicom(
        images_from(rows),
        cfg.write_dicom,
        ids=rows.column("id").to_pylist(),
        labels=rows.column("label").to_pylist(),
        model_hash=model_hash,
        seed=cfg.seed,
    )


def sample_pictures(
    model_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    label: str | None = None,
    how: AugmentConfig | None = None,
) -> list[str]:
    """Grids of synthetic samples, one per label the model can sample (or the one asked for).

    Only synthetic images: real scans (and any text burned into them) never go into these pictures.
    ``how`` gives the sampler, temperature and detail restoration (default: AugmentConfig's), so that
    the pictures show what augment commits.
    """
    from medvae.synth.pictures import save_grid
    from medvae.synth.sample import sample_images
    from medvae.vae.artifacts import load_model

    loaded = load_model(model_dir)
    base = how or AugmentConfig()
    cfg = base.model_copy(
        update={"count": 32 * max(1, len(loaded.label_names)), "label": label, "seed": seed}
    )
    draws = _with_seeds(plan_draws(loaded.label_names, loaded.cfg.model.conditional, cfg), seed)
    paths = []
    making = _sampling(model_dir, cfg)
    for draw in draws:
        images = sample_images(
            loaded.model,
            32,
            label_index=draw.label_index,
            seed=draw.seed,
            sampler=making.sampler,
            detail=making.detail,
        )
        name = f"samples_{draw.label}.png" if draw.label else "samples.png"
        caption = f"synthetic · label {draw.label or '-'} · {cfg.sampler} sampler · model {loaded.hash[:12]}"
        caption += f" · seed {draw.seed}" + (" · detail restored" if making.detail else "")
        paths.append(str(save_grid(images, out_dir / _safe(name), caption=caption)))
    return paths


def _safe(name: str) -> str:
    from medvae._io import safe_name

    return safe_name(name.removesuffix(".png"), "samples") + ".png"
