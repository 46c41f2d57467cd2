"""Stage jobs that join the store to training, generation and scoring: what the CLI and the flows call."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medvae.config import AugmentConfig, IngestConfig, ScreenConfig, TrainConfig, to_jsonable
from medvae.data.deid import keyed_hash
from medvae.data.store import SCHEMA, SCORE_COLUMNS, Store, StoreError, images_from, lineage, to_arrow

MIN_VAL = 8  # fewer held-out images than this cannot calibrate a threshold


def _grouped_holdout(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a patient-grouped hold-out of about ``fraction`` of the rows."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_hold = max(1, round(len(uniq) * fraction))
    held = set(uniq[:n_hold])
    return np.array([g in held for g in groups], dtype=bool)


def load_training_data(
    store: Store, version: int | None, where: dict[str, str] | None, cfg: TrainConfig
) -> dict[str, Any]:
    """Real rows of a version, split into train and validation by patient.

    The store's own ``split`` column (assigned at ingest by keyed patient hash) decides; when its val
    split is too small to calibrate on (tiny datasets), train+val are re-split by patient here.
    """
    flt = {"origin": "real", **(where or {})}
    table = store.read(version, where=flt)
    if table.num_rows == 0:
        raise StoreError(f"no rows in {store.uri} match {flt}; check --where and --version")
    images = images_from(table)
    labels = table.column("label").to_pylist()
    split = np.array([s or "train" for s in table.column("split").to_pylist()])
    groups = [
        p or s
        for p, s in zip(table.column("patient_key").to_pylist(), table.column("id").to_pylist(), strict=True)
    ]
    pool = split != "test"  # the test split is never used for training or calibration
    val = pool & (split == "val")
    if val.sum() < MIN_VAL:
        idx = np.flatnonzero(pool)
        hold = _grouped_holdout([groups[i] for i in idx], cfg.val_fraction, cfg.seed)
        val = np.zeros(len(split), dtype=bool)
        val[idx[hold]] = True
    train = pool & ~val
    if train.sum() < 2:
        raise StoreError(f"only {int(train.sum())} training rows in {store.uri} for {flt}: need at least 2")
    names = sorted({lbl for lbl in labels if lbl is not None})
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(lbl, 0) if lbl is not None else 0 for lbl in labels], dtype=np.int64)
    return {
        "train_images": images[train],
        "train_labels": y[train],
        "val_images": images[val],
        "val_labels": y[val],
        "label_names": names,
        "version": store.table(version).version(),
        "where": flt,
    }


def train_job(
    store_uri: str,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    version: int | None = None,
    where: dict[str, str] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a VAE on a store version, calibrate its anomaly threshold and write the model directory.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: it joins the process group, all ranks
    read the same store version (rank 0 pins the latest), train together with DDP, and rank 0 alone
    writes the model directory and calibrates; every rank returns rank 0's result.

    Returns:
        ``{"model_dir", "model_hash", "dataset_version", "best_epoch", "val_loss", "threshold", "device"}``.
    """
    from medvae.anomaly.scoring import calibrate
    from medvae.engine import strategy as distributed
    from medvae.engine.trainer import train_vae
    from medvae.vae.artifacts import save_model_dir, write_json, write_tensors

    store = Store(store_uri)
    with distributed.session(cfg.device) as ddp:
        if ddp is not None and version is None:
            # A commit between two ranks' reads would give them different data: read rank 0's latest.
            version = distributed.on_main(lambda: int(store.table().version()), ddp)
        data = load_training_data(store, version, where, cfg)
        if cfg.model.conditional:
            cfg = cfg.model_copy(
                update={"model": cfg.model.model_copy(update={"num_classes": len(data["label_names"])})}
            )
        result = train_vae(
            data["train_images"],
            data["train_labels"] if cfg.model.conditional else None,
            cfg,
            val_images=data["val_images"],
            val_labels=data["val_labels"] if cfg.model.conditional else None,
            checkpoint_dir=out_dir / "checkpoint",
            resume=resume,
            progress=progress,
        )

        def finish() -> dict[str, Any]:
            dataset = {
                "store": store_uri,
                "version": data["version"],
                "where": data["where"],
                # How the training pixels were made: screening prepares new scans the same way.
                "image_settings": store.image_settings(),
                "train_rows": len(data["train_images"]),
                "val_rows": len(data["val_images"]),
            }
            best = result.history[result.best_epoch] if result.history else {}
            metrics = {
                "history": result.history,
                "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early,
                "device": result.device,
                "best": best,
            }
            save_model_dir(
                out_dir, result.model, cfg, label_names=data["label_names"], dataset=dataset, metrics=metrics
            )
            model = result.model.cpu().eval()
            cal = calibrate(
                model,
                data["train_images"],
                data["val_images"],
                train_labels=data["train_labels"] if cfg.model.conditional else None,
                val_labels=data["val_labels"] if cfg.model.conditional else None,
                fpr=cfg.false_positive_rate,
                recon_kind=cfg.loss.reconstruction,
            )
            cal_json, cal_tensors = cal.to_files()
            write_json(out_dir, "calibration.json", cal_json)
            write_tensors(out_dir, "calibration.safetensors", cal_tensors)
            from medvae.vae.artifacts import model_hash

            return {
                "model_dir": str(out_dir),
                "model_hash": model_hash(out_dir),
                "dataset_version": data["version"],
                "best_epoch": result.best_epoch,
                "val_loss": best.get("val_loss"),
                "threshold": cal.threshold,
                "device": result.device,
            }

        # Several processes: rank 0 writes the model directory and calibrates, the others wait for it.
        return finish() if ddp is None else distributed.on_main(finish, ddp)


def _load(model_dir: Path) -> Any:
    from medvae.anomaly.scoring import Calibration
    from medvae.vae.artifacts import load_model, read_json, read_tensors

    loaded = load_model(model_dir)
    cal = Calibration.from_files(
        read_json(model_dir, "calibration.json"), read_tensors(model_dir, "calibration.safetensors")
    )
    return loaded, cal


def generate_synthetic(
    model_dir: Path, store_uri: str, cfg: AugmentConfig
) -> tuple[pa.Table, dict[str, Any]]:
    """Sample synthetic images, drop those too close to a training image, and build store rows.

    Returns:
        The rows to commit (origin synthetic, label, model hash, seed) and the privacy-filter figures.
    """
    from medvae.synth.generation import (
        privacy_filter,
        privacy_threshold,
        sample_images,
        write_synthetic_dicom,
    )

    loaded, _ = _load(model_dir)
    ds = loaded.meta.get("dataset", {})
    # The privacy reference is every real row matching the training filter: a superset of what the
    # model saw (its val and test rows too), which only makes the filter stricter.
    train = images_from(
        Store(ds.get("store", store_uri)).read(ds.get("version"), where=ds.get("where") or None)
    )
    names: list[str] = loaded.label_names
    plan: list[tuple[int | None, str | None, int]]
    if loaded.cfg.model.conditional:
        wanted = [cfg.label] if cfg.label else names
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"label {unknown[0]!r} is not one the model knows: {names}")
        plan = [
            (names.index(w), w, cfg.count // len(wanted) + (i < cfg.count % len(wanted)))
            for i, w in enumerate(wanted)
        ]
    else:
        only = names[0] if len(names) == 1 else None
        plan = [(None, cfg.label or only, cfg.count)]
    threshold = privacy_threshold(train, cfg.privacy_quantile)
    rows = {name: [] for name in SCHEMA.names}  # type: dict[str, list[Any]]
    kept_imgs: list[np.ndarray] = []
    kept_labels: list[str | None] = []
    total = rejected = 0
    for j, (idx, label, n) in enumerate(plan):
        if n <= 0:
            continue
        seed = cfg.seed * 1000 + j
        samples = sample_images(loaded.model, n, label_index=idx, seed=seed)
        res = privacy_filter(samples, train, threshold)
        total += n
        rejected += int((~res.keep).sum())
        for k in np.flatnonzero(res.keep):
            rid = "syn-" + keyed_hash(loaded.hash.encode(), "synthetic", f"{seed}:{k}".encode())[:28]
            rows["id"].append(rid)
            rows["height"].append(samples.shape[1])
            rows["width"].append(samples.shape[2])
            rows["pixels"].append(samples[k].tobytes())
            rows["label"].append(label)
            rows["origin"].append("synthetic")
            rows["model_hash"].append(loaded.hash)
            rows["seed"].append(seed)
            rows["split"].append("train")
            kept_imgs.append(samples[k])
            kept_labels.append(label)
    stats = {
        "requested": total,
        "kept": total - rejected,
        "rejected": rejected,
        "rejection_rate": rejected / total if total else 0.0,
        "privacy_threshold": threshold,
        "model_hash": loaded.hash,
    }
    if cfg.write_dicom is not None and kept_imgs:
        paths = write_synthetic_dicom(
            np.stack(kept_imgs), cfg.write_dicom, labels=kept_labels, model_hash=loaded.hash, seed=cfg.seed
        )
        stats["dicom_files"] = len(paths)
    return to_arrow(rows), stats


def augment_job(model_dir: Path, store_uri: str, cfg: AugmentConfig) -> dict[str, Any]:
    """Generate synthetic images and commit the kept ones as one new store version."""
    rows, stats = generate_synthetic(model_dir, store_uri, cfg)
    meta = lineage("augment", to_jsonable(cfg), model_hash=stats["model_hash"], privacy=stats)
    stats["version"] = Store(store_uri).insert_new(rows, meta)
    return stats


def pictures_job(model_dir: Path, store_uri: str, out_dir: Path, seed: int = 0) -> list[str]:
    """Write reconstruction, sample and latent-interpolation grids of a model as PNGs."""
    from medvae.synth.generation import interpolation_grid, reconstruction_grid, sample_images, save_grid

    loaded, _ = _load(model_dir)
    ds = loaded.meta.get("dataset", {})
    imgs = images_from(
        Store(ds.get("store", store_uri)).read(ds.get("version"), where=ds.get("where") or None)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cond = loaded.cfg.model.conditional
    lab0 = np.zeros(min(16, len(imgs)), dtype=np.int64) if cond else None
    paths = [reconstruction_grid(loaded.model, imgs[:16], out_dir / "reconstructions.png", labels=lab0)]
    paths.append(
        save_grid(
            sample_images(loaded.model, 32, label_index=0 if cond else None, seed=seed),
            out_dir / "samples.png",
        )
    )
    if len(imgs) >= 2:
        paths.append(
            interpolation_grid(
                loaded.model, imgs[0], imgs[-1], out_dir / "interpolation.png", label=0 if cond else None
            )
        )
    return [str(p) for p in paths]


def score_images(
    model_dir: Path, images: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every anomaly score, the percentile among held-out normals and the flag, for uint8 images."""
    from medvae.anomaly.scoring import screen

    loaded, cal = _load(model_dir)
    if loaded.cfg.model.conditional and labels is None:
        # New scans have no label: score them against the normal (first) class.
        labels = np.zeros(len(images), dtype=np.int64)
    return screen(loaded.model, images, cal, labels=labels)


def score_store_rows(model_dir: Path, store_uri: str, version: int | None = None) -> pa.Table:
    """Rows of every real image in a version with their score columns filled, ready to upsert."""
    from medvae.vae.artifacts import model_hash

    table = Store(store_uri).read(version, where={"origin": "real"})
    res = score_images(model_dir, images_from(table))
    h = model_hash(model_dir)
    cols = table.to_pydict()
    cols["anomaly_score"] = res["score"].tolist()
    cols["anomaly_percentile"] = res["percentile"].tolist()
    cols["anomaly_flag"] = res["flag"].astype(bool).tolist()
    cols["score_recon"] = res["recon"].tolist()
    cols["score_kl"] = res["kl"].tolist()
    cols["score_model_hash"] = [h] * table.num_rows
    return pa.table(cols, schema=SCHEMA)


def commit_pipeline(store_uri: str, parts: Sequence[Path], meta: dict[str, Any]) -> int:
    """Commit staged synthetic rows and real-row scores as ONE new version (update scores, insert rows)."""
    tables = [pq.read_table(p).cast(SCHEMA) for p in parts if Path(p).exists()]
    rows = pa.concat_tables(tables) if tables else to_arrow({n: [] for n in SCHEMA.names})
    return Store(store_uri).upsert(rows, meta, SCORE_COLUMNS)


def stage(table: pa.Table, path: Path) -> str:
    """Write rows to a staging Parquet file atomically; flows pass its path, never the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return str(path)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


_SCREEN_SCORES = ("score", "percentile", "flag", "mahalanobis", "recon", "kl", "elbo")


def screen_settings(model_dir: Path) -> IngestConfig:
    """The ingest settings that prepared the model's training images: new scans are prepared the same."""
    from medvae.vae.artifacts import read_json

    settings = (read_json(model_dir, "meta.json").get("dataset") or {}).get("image_settings") or {}
    return IngestConfig(**{k: v for k, v in settings.items() if v is not None})


def screen_files(
    model_dir: Path, files: Sequence[tuple[str, str | None]], icfg: IngestConfig
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Decode and score files; the per-file core of every screening run.

    Args:
        model_dir: the model directory.
        files: ``(path, walk_error)`` pairs; a file with a walk error is rejected with it.
        icfg: how to prepare the scans (see :func:`screen_settings`).

    Returns:
        One record per file, in order (``file``, ``status`` scored/rejected, ``reason``, and the scores of
        the scored ones), and the prepared uint8 images of the scored files, stacked.
    """
    from medvae.data.ingest import stored_image
    from medvae.data.readers import RejectedInput, decode_file

    records: list[dict[str, Any]] = []
    imgs: list[np.ndarray] = []
    for path, err in files:
        if err:
            records.append({"file": path, "status": "rejected", "reason": err})
            continue
        try:
            dec = decode_file(Path(path), icfg)
            imgs.append(stored_image(dec[0].pixels, icfg))
            records.append({"file": path, "status": "scored", "reason": ""})
        except RejectedInput as exc:
            records.append({"file": path, "status": "rejected", "reason": exc.reason})
        except Exception as exc:  # one bad scan must not stop a screening batch
            reason = f"unexpected error {type(exc).__name__}: {exc}"
            records.append({"file": path, "status": "rejected", "reason": reason})
    batch = np.stack(imgs) if imgs else np.zeros((0, icfg.size, icfg.size), np.uint8)
    if imgs:
        res = score_images(model_dir, batch)
        scored = (r for r in records if r["status"] == "scored")
        for i, rec in enumerate(scored):
            rec.update({k: bool(res[k][i]) if k == "flag" else float(res[k][i]) for k in _SCREEN_SCORES})
    return records, batch


def _heatmaps(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    from medvae.anomaly.scoring import heatmaps
    from medvae.vae.artifacts import load_model

    loaded = load_model(model_dir)
    lab = np.zeros(len(batch), dtype=np.int64) if loaded.cfg.model.conditional else None
    return heatmaps(loaded.model, batch, labels=lab)


def write_screen_outputs(
    records: list[dict[str, Any]],
    out_csv: Path | None,
    heatmaps_dir: Path | None,
    images: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write the screening CSV (scored files first, then rejected ones) and the heat-map PNGs.

    Returns:
        The summary that :func:`screen_job` returns.
    """
    from medvae.anomaly.scoring import save_heatmap_pngs

    scored = [r for r in records if r["status"] == "scored"]
    rejected = [r for r in records if r["status"] != "scored"]
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "status", *_SCREEN_SCORES, "reason"])
            for r in scored:
                w.writerow(
                    [
                        r["file"],
                        "scored",
                        f"{r['score']:.6g}",
                        f"{r['percentile']:.2f}",
                        int(r["flag"]),
                        *(f"{r[k]:.6g}" for k in ("mahalanobis", "recon", "kl", "elbo")),
                        "",
                    ]
                )
            for r in rejected:
                w.writerow([r["file"], "rejected", "", "", "", "", "", "", "", r["reason"]])
    if heatmaps_dir is not None and images is not None and maps is not None and len(images):
        # File names may carry PHI: heat maps are named by their row among the scored scans only.
        save_heatmap_pngs(images, maps, heatmaps_dir, [f"scan_{i:05d}" for i in range(len(images))])
    return {
        "scored": len(scored),
        "rejected": len(rejected),
        "flagged": sum(bool(r["flag"]) for r in scored),
        "results": [
            {"file": r["file"], "score": r["score"], "percentile": r["percentile"], "flag": r["flag"]}
            for r in scored
        ],
        "rejected_files": [{"file": r["file"], "reason": r["reason"]} for r in rejected],
    }


def screen_job(
    model_dir: Path,
    sources: Sequence[Path],
    *,
    out_csv: Path | None = None,
    heatmaps_dir: Path | None = None,
    ingest_cfg: IngestConfig | None = None,
    screen_cfg: ScreenConfig | None = None,
) -> dict[str, Any]:
    """Screen new scans: decode them with the ingest readers, score them, write a CSV and heat maps.

    Files that cannot be read are listed with their reason; they never stop the batch.
    """
    from medvae.data.ingest import iter_files

    icfg = ingest_cfg if ingest_cfg is not None else screen_settings(model_dir)
    _ = screen_cfg or ScreenConfig()
    files = [(str(p), err) for p, err in iter_files(list(sources))]
    records, batch = screen_files(model_dir, files, icfg)
    maps = _heatmaps(model_dir, batch) if heatmaps_dir is not None and len(batch) else None
    return write_screen_outputs(records, out_csv, heatmaps_dir, batch, maps)


# ------------------------------------------------------------------- batches on a task runner
def prepare_screen_batches(sources: Sequence[Path], staging: str, batch_files: int) -> dict[str, Any]:
    """Walk ``sources`` and write file batches to ``staging`` for :func:`screen_batch` tasks.

    Returns:
        ``{"staging", "batches", "files"}``.
    """
    import json

    from medvae.data.ingest import iter_files
    from medvae.data.staging import write_bytes

    entries = [
        [slot, str(p), os.path.abspath(p), err] for slot, (p, err) in enumerate(iter_files(list(sources)))
    ]
    batches = [entries[i : i + batch_files] for i in range(0, len(entries), batch_files)]
    for n, b in enumerate(batches):
        write_bytes(f"{staging}/batch-{n:06d}.json", json.dumps(b).encode())
    plan = {"files": len(entries), "batches": len(batches)}
    write_bytes(f"{staging}/plan.json", json.dumps(plan).encode())
    return {"staging": staging, "batches": len(batches), "files": len(entries)}


def screen_batch(model_dir: Path, staging: str, index: int, heatmaps: bool) -> dict[str, Any]:
    """Score batch ``index`` of a staged screening plan; stage its records (and raw heat maps).

    Returns:
        ``{"batch", "scored", "rejected"}``.
    """
    import io
    import json

    from medvae.data.staging import read_bytes, write_bytes

    entries = json.loads(read_bytes(f"{staging}/batch-{index:06d}.json"))
    records, batch = screen_files(model_dir, [(e[2], e[3]) for e in entries], screen_settings(model_dir))
    for e, rec in zip(entries, records, strict=True):
        rec["slot"], rec["file"] = e[0], e[1]
    write_bytes(f"{staging}/records-{index:06d}.json", json.dumps(records).encode())
    if heatmaps:
        # Raw maps, not PNGs: the PNGs share one colour scale over the whole run, known only at merge.
        buf = io.BytesIO()
        np.savez(buf, images=batch, maps=_heatmaps(model_dir, batch) if len(batch) else batch)
        write_bytes(f"{staging}/maps-{index:06d}.npz", buf.getvalue())
    n_scored = sum(r["status"] == "scored" for r in records)
    return {"batch": index, "scored": n_scored, "rejected": len(records) - n_scored}


def merge_screen(
    staging: str, out_csv: Path | None, heatmaps_dir: Path | None, *, cleanup: bool = True
) -> dict[str, Any]:
    """Merge every staged batch into the same CSV and heat maps that :func:`screen_job` writes.

    Raises:
        RuntimeError: when a batch has no output (its task never finished).
    """
    import io
    import json

    from medvae.data.staging import read_bytes, remove_tree

    plan = json.loads(read_bytes(f"{staging}/plan.json"))
    records: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for n in range(int(plan["batches"])):
        try:
            records += json.loads(read_bytes(f"{staging}/records-{n:06d}.json"))
            if heatmaps_dir is not None:
                with np.load(io.BytesIO(read_bytes(f"{staging}/maps-{n:06d}.npz"))) as z:
                    images.append(z["images"])
                    maps.append(z["maps"].astype(np.float32))
        except (FileNotFoundError, OSError) as exc:
            raise RuntimeError(f"batch {n} of {staging} has no output ({exc}); re-run the screening") from exc
    records.sort(key=lambda r: r["slot"])
    if len(records) != int(plan["files"]):
        raise RuntimeError(f"{staging}: {len(records)} of {plan['files']} files have a result")
    imgs = np.concatenate(images) if images else None
    res = write_screen_outputs(records, out_csv, heatmaps_dir, imgs, np.concatenate(maps) if maps else None)
    if cleanup:
        remove_tree(staging)
    return res
