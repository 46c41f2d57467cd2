"""The train job: a store version -> a trained, calibrated, self-describing model directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae.config import TrainConfig
from medvae.data.splits import grouped_holdout
from medvae.data.store import Store, StoreError, images_from
from medvae.jobs.results import TrainedModel

MIN_VAL = 8  # fewer held-out images than this cannot calibrate a threshold

Where = dict[str, str | list[str]]


@dataclass(frozen=True, eq=False)
class TrainingData:
    """The real rows of one store version, split by patient into train and validation.

    Attributes:
        train_images: uint8 (N, H, W).
        train_labels: label indices into ``label_names`` (0 for unlabelled rows).
        val_images: uint8 (M, H, W), held out by patient.
        val_labels: their label indices.
        label_names: the labels present, sorted.
        version: the store version read.
        where: the row filter applied (``origin: real`` included).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    label_names: list[str]
    version: int
    where: Where


def load_training_data(
    store: Store, version: int | None, where: Where | None, cfg: TrainConfig
) -> TrainingData:
    """Real rows of a version, split into train and validation by patient.

    The store's own ``split`` column (assigned at ingest by keyed patient hash) decides; when its val
    split is too small to calibrate on (tiny datasets), train+val are re-split by patient here. The test
    split is never used for training or calibration.

    Raises:
        StoreError: when no row matches, or fewer than 2 rows are left for training.
    """
    flt: Where = {"origin": "real", **(where or {})}
    table = store.read(version, where=flt)
    if table.num_rows == 0:
        raise StoreError(f"no rows in {store.uri} match {flt}; check --where and --version")
    labels = table.column("label").to_pylist()
    split = np.array([s or "train" for s in table.column("split").to_pylist()])
    ids = table.column("id").to_pylist()
    groups = [p or i for p, i in zip(table.column("patient_key").to_pylist(), ids, strict=True)]
    pool = split != "test"
    val = pool & (split == "val")
    if val.sum() < MIN_VAL:
        idx = np.flatnonzero(pool)
        val = np.zeros(len(split), dtype=bool)
        val[idx[grouped_holdout([groups[i] for i in idx], cfg.val_fraction, cfg.seed)]] = True
    train = pool & ~val
    if train.sum() < 2:
        raise StoreError(f"only {int(train.sum())} training rows in {store.uri} for {flt}: need at least 2")
    names = sorted({lbl for lbl in labels if lbl is not None})
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(lbl, 0) if lbl is not None else 0 for lbl in labels], dtype=np.int64)
    images = images_from(table)
    return TrainingData(
        images[train], y[train], images[val], y[val], names, store.table(version).version(), flt
    )


def train_job(
    store_uri: str,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    version: int | None = None,
    where: Where | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainedModel:
    """Train a VAE on a store version, calibrate its anomaly threshold and write the model directory.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: it joins the process group, all ranks
    read the same store version (rank 0 pins the latest), train together with DDP, and rank 0 alone
    writes the model directory and calibrates; every rank returns rank 0's result.
    """
    from medvae.engine import strategy as distributed
    from medvae.engine.trainer import train_vae

    store = Store(store_uri)
    with distributed.session(cfg.device) as strategy:
        if strategy.world_size > 1 and version is None:
            # A commit between two ranks' reads would give them different data: read rank 0's latest.
            version = strategy.on_main(lambda: int(store.table().version()))
        data = load_training_data(store, version, where, cfg)
        if cfg.model.conditional:
            cfg = cfg.model_copy(
                update={"model": cfg.model.model_copy(update={"num_classes": len(data.label_names)})}
            )
        cond = cfg.model.conditional
        result = train_vae(
            data.train_images,
            data.train_labels if cond else None,
            cfg,
            val_images=data.val_images,
            val_labels=data.val_labels if cond else None,
            checkpoint_dir=out_dir / "checkpoint",
            resume=resume,
            progress=progress,
            strategy=strategy,
        )

        def finish() -> TrainedModel:
            return _write_model_dir(store, out_dir, cfg, data, result)

        # Several processes: rank 0 writes the model directory and calibrates, the others wait for it.
        return strategy.on_main(finish)


def _write_sampler(out_dir: Path, model: Any, data: TrainingData, seed: int) -> None:
    """Fit the latent sampler that synthetic images start from, on the training posterior means, and the
    detail restoration of its samples, on the training images' sharpness."""
    from medvae.synth.detail import DETAIL_JSON
    from medvae.synth.latent import SAMPLER_JSON, SAMPLER_TENSORS
    from medvae.synth.sample import fit_sampling
    from medvae.vae.artifacts import write_json, write_tensors

    how = fit_sampling(model, data.train_images, data.train_labels, seed=seed)
    assert how.sampler is not None and how.detail is not None  # both asked for
    meta, tensors = how.sampler.to_files()
    write_tensors(out_dir, SAMPLER_TENSORS, tensors)
    write_json(out_dir, SAMPLER_JSON, meta)
    write_json(out_dir, DETAIL_JSON, how.detail.to_json())


def _write_model_dir(
    store: Store, out_dir: Path, cfg: TrainConfig, data: TrainingData, result: Any
) -> TrainedModel:
    """Save the trained model, calibrate it on the held-out rows, and describe the result."""
    from medvae.anomaly.calibration import calibrate, calibration_warnings
    from medvae.vae.artifacts import model_hash, save_model_dir, sign, write_json, write_tensors

    dataset = {
        "store": store.uri,
        "version": data.version,
        "where": data.where,
        # How the training pixels were made: screening prepares new scans the same way.
        "image_settings": store.image_settings(),
        "train_rows": len(data.train_images),
        "val_rows": len(data.val_images),
    }
    best = result.history[result.best_epoch] if result.history else {}
    metrics = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "device": result.device,
        "best": best,
    }
    save_model_dir(out_dir, result.model, cfg, label_names=data.label_names, dataset=dataset, metrics=metrics)
    cond = cfg.model.conditional
    cal = calibrate(
        result.model.cpu().eval(),
        data.train_images,
        data.val_images,
        train_labels=data.train_labels if cond else None,
        val_labels=data.val_labels if cond else None,
        fpr=cfg.false_positive_rate,
        recon_kind=cfg.loss.reconstruction,
    )
    cal_json, cal_tensors = cal.to_files()
    write_json(out_dir, "calibration.json", cal_json)
    write_tensors(out_dir, "calibration.safetensors", cal_tensors)
    _write_sampler(out_dir, result.model, data, cfg.seed)
    # Last: keyed by the training store's secret, so a swapped weight file or an edited threshold is
    # refused by anyone who holds the store (augment, the pipeline's screen).
    sign(out_dir, store.key())
    return TrainedModel(
        model_dir=str(out_dir),
        model_hash=model_hash(out_dir),
        dataset_version=data.version,
        best_epoch=result.best_epoch,
        val_loss=best.get("val_loss"),
        threshold=float(cal.threshold),
        device=result.device,
        n_val_normals=cal.n_val,
        warnings=tuple(calibration_warnings(cal)),
    )
