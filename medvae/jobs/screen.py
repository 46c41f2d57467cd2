"""The screen job: score new scans against a model's calibration, write a CSV and heat maps.

A model directory is loaded and hash-checked once per run (or once per batch on a task runner) into a
:class:`Screener`; every file is prepared exactly as the model's training images were.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medvae.config import IngestConfig, ScreenConfig
from medvae.jobs.results import RecalibrationResult, ScreenRecord, ScreenResult

# The score columns of the screening CSV, in order.
SCORE_FIELDS = (
    "score",
    "percentile",
    "flag",
    "unlike",
    "lowpass_error",
    "mahalanobis",
    "recon",
    "kl",
    "elbo",
)


@dataclass(eq=False)
class Screener:
    """A loaded model, its calibration (for the configured score) and how to prepare new scans."""

    loaded: Any  # medvae.vae.artifacts.LoadedModel
    calibration: Any  # medvae.anomaly.calibration.Calibration
    prepare: IngestConfig
    cfg: ScreenConfig = field(default_factory=ScreenConfig)

    @classmethod
    def load(cls, model_dir: Path, cfg: ScreenConfig | None = None, key: bytes | None = None) -> Screener:
        """Load and verify a model directory once, with the calibration of ``cfg.score``.

        With ``key`` (the training store's), a signed directory must also match its signature.
        """
        from medvae.vae.artifacts import load_model

        loaded = load_model(model_dir, key=key)
        cfg = cfg or ScreenConfig()
        return cls(loaded, _screen_calibration(model_dir, cfg), screen_settings(loaded.meta), cfg)

    def _labels(self, n: int) -> np.ndarray | None:
        # New scans have no trusted label: a conditional model scores them against the normal (first) class.
        return np.zeros(n, dtype=np.int64) if self.loaded.cfg.model.conditional else None

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every anomaly score, the percentile among held-out normals and the flag, for uint8 images."""
        from medvae.anomaly.calibration import screen

        return screen(
            self.loaded.model,
            images,
            self.calibration,
            labels=self._labels(len(images)),
            unlike_factor=self.cfg.unlike_factor,
        )

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """Heat maps of the deciding (calibrated) score for ``images`` (N, H, W) (see ``score_maps``)."""
        from medvae.anomaly.heatmaps import score_maps

        return score_maps(self.loaded.model, images, self.calibration, labels=self._labels(len(images)))


def screen_settings(meta: dict[str, Any]) -> IngestConfig:
    """The ingest settings that prepared a model's training images (from its ``meta.json``)."""
    settings = (meta.get("dataset") or {}).get("image_settings") or {}
    return IngestConfig(**{k: v for k, v in settings.items() if v is not None})


def _prepare(path: str, icfg: IngestConfig) -> tuple[np.ndarray, str]:
    """The stored form of a scan file and its row name (a digest of its bytes, never its file name)."""
    from medvae.data.prepare import stored_image
    from medvae.data.readers import decode_bytes, read_scan

    data = read_scan(Path(path), icfg)  # regular files only, within max_file_bytes (a FIFO would block)
    image = stored_image(decode_bytes(data, Path(path).name, icfg)[0].pixels, icfg)
    return image, "scan-" + hashlib.sha256(data).hexdigest()[:16]


def screen_files(
    screener: Screener, files: Sequence[tuple[str, str | None]]
) -> tuple[list[ScreenRecord], np.ndarray]:
    """Decode and score files; the per-file core of every screening run. One bad file never stops it.

    Args:
        screener: the loaded model.
        files: ``(path, walk_error)`` pairs; a file with a walk error is rejected with it.

    Returns:
        One record per file, in input order, and the prepared uint8 images of the scored ones, stacked.
    """
    from medvae.data.readers import RejectedInput

    records: list[ScreenRecord] = []
    images: list[np.ndarray] = []
    for path, err in files:
        if err:
            records.append(ScreenRecord(path, "rejected", err))
            continue
        try:
            image, name = _prepare(path, screener.prepare)
        except RejectedInput as exc:
            records.append(ScreenRecord(path, "rejected", exc.reason))
            continue
        except Exception as exc:  # a decoder bug must not stop the batch either
            records.append(ScreenRecord(path, "rejected", f"unexpected error {type(exc).__name__}"))
            continue
        images.append(image)
        records.append(ScreenRecord(path, "scored", "", name))
    size = screener.prepare.size
    batch = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return _with_scores(records, screener.score(batch) if len(batch) else {}), batch


def _with_scores(records: list[ScreenRecord], res: dict[str, np.ndarray]) -> list[ScreenRecord]:
    out, i = [], 0
    for r in records:
        if r.status == "scored":
            scores = {k: float(res[k][i]) for k in SCORE_FIELDS}
            out.append(ScreenRecord(r.file, r.status, r.reason, r.name, scores))
            i += 1
        else:
            out.append(r)
    return out


def write_csv(records: Sequence[ScreenRecord], path: Path) -> None:
    """The screening CSV: scored files first (input order), then rejected ones with their reasons.

    Each row names its input file (the operator's own path) and its heat map (``<name>.png``).
    """
    from medvae._io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "status", "heatmap", *SCORE_FIELDS, "reason"])
    for r in sorted(records, key=lambda r: r.status != "scored"):
        if r.status == "scored":
            vals = [_cell(k, r.scores[k]) for k in SCORE_FIELDS]
            w.writerow([r.file, r.status, f"{r.name}.png", *vals, ""])
        else:
            w.writerow([r.file, r.status, "", *[""] * len(SCORE_FIELDS), r.reason])
    atomic_write_text(path, buf.getvalue())


def _cell(field: str, value: float) -> str:
    if field in ("flag", "unlike"):
        return str(int(value))
    return f"{value:.2f}" if field == "percentile" else f"{value:.6g}"


def _caption(r: ScreenRecord) -> str:
    # The row name, never the file name: heat maps get shared, and file names can name patients.
    flag = "FLAGGED" if r.flagged else "not flagged"
    if r.scores.get("unlike"):
        flag += " (unlike training)"
    return f"{r.name}\nscore {r.scores['score']:.3g}  {r.scores['percentile']:.0f}th pct of normals  {flag}"


def write_outputs(
    records: Sequence[ScreenRecord],
    out_csv: Path | None,
    heatmaps_dir: Path | None,
    images: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> ScreenResult:
    """Write the CSV and the heat-map PNGs (named by row, see :class:`ScreenRecord`)."""
    from medvae.anomaly.heatmaps import save_heatmap_pngs

    if out_csv is not None:
        write_csv(records, out_csv)
    if heatmaps_dir is not None and images is not None and maps is not None and len(images):
        scored = [r for r in records if r.status == "scored"]
        save_heatmap_pngs(
            images, maps, heatmaps_dir, [r.name for r in scored], captions=[_caption(r) for r in scored]
        )
    warnings = () if records else ("no files found in the given sources",)
    return ScreenResult(
        tuple(records),
        str(out_csv) if out_csv else None,
        str(heatmaps_dir) if heatmaps_dir else None,
        warnings,
    )


def screen_job(
    model_dir: Path,
    sources: Sequence[Path],
    *,
    out_csv: Path | None = None,
    heatmaps_dir: Path | None = None,
    cfg: ScreenConfig | None = None,
) -> ScreenResult:
    """Screen new scans: decode them like the training images, score them, write a CSV and heat maps.

    Files that cannot be read are listed with their reason; they never stop the batch.
    """
    from medvae.data.walk import iter_files

    screener = Screener.load(model_dir, cfg)
    files = [(str(p), err) for p, err in iter_files(list(sources))]
    records, batch = screen_files(screener, files)
    maps = screener.heatmaps(batch) if heatmaps_dir is not None and len(batch) else None
    res = write_outputs(records, out_csv, heatmaps_dir, batch, maps)
    return replace(res, warnings=res.warnings + threshold_warnings(screener.calibration, res.counts()))


def threshold_warnings(cal: Any, counts: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """What an operator must know about the threshold a screening flags by, and, given the run's
    ``counts`` (``scored``, ``flagged``), about a run that flagged most of its batch (see
    :func:`medvae.anomaly.calibration.cohort_warnings`, ``calibration_warnings`` and
    ``flagged_share_warnings``)."""
    from medvae.anomaly.calibration import calibration_warnings, cohort_warnings, flagged_share_warnings

    share = [] if counts is None else flagged_share_warnings(counts["scored"], counts["flagged"], cal.fpr)
    unlike = (counts or {}).get("unlike", 0)
    if unlike:
        share.append(
            f"{unlike} scan(s) lie far outside the training normals (latent distance above the guard, column "
            "`unlike`): they are flagged whatever their score; check that they are the view, age group and "
            "modality the model was trained on"
        )
    return tuple(cohort_warnings(cal) + calibration_warnings(cal) + share)


def model_threshold_warnings(
    model_dir: Path, cfg: ScreenConfig | None = None, counts: Mapping[str, int] | None = None
) -> tuple[str, ...]:
    """:func:`threshold_warnings` of a model directory's calibration for ``cfg.score`` (the batched
    screening flow, whose merged result does not load the model)."""
    return threshold_warnings(_screen_calibration(model_dir, cfg), counts)


def _screen_calibration(model_dir: Path, cfg: ScreenConfig | None) -> Any:
    """The model directory's calibration for the score that flags (``cfg.score``)."""
    from medvae.anomaly.calibration import load_calibration

    return load_calibration(model_dir).for_score((cfg or ScreenConfig()).score)


# ------------------------------------------------------------------- batches on a task runner
def prepare_screen_batches(sources: Sequence[Path], staging: str, batch_files: int) -> int:
    """Walk ``sources`` and write file batches to ``staging`` for :func:`screen_batch` tasks.

    Returns:
        The number of batches.
    """
    from medvae.data.staging import write_bytes
    from medvae.data.walk import iter_files

    entries = [
        [slot, str(p), os.path.abspath(p), err] for slot, (p, err) in enumerate(iter_files(list(sources)))
    ]
    batches = [entries[i : i + batch_files] for i in range(0, len(entries), batch_files)]
    for n, b in enumerate(batches):
        write_bytes(f"{staging}/batch-{n:06d}.json", json.dumps(b).encode())
    write_bytes(f"{staging}/plan.json", json.dumps({"files": len(entries), "batches": len(batches)}).encode())
    return len(batches)


def screen_batch(
    model_dir: Path, staging: str, index: int, heatmaps: bool, cfg: ScreenConfig | None = None
) -> int:
    """Score batch ``index`` of a staged plan; stage its records (and raw heat maps).

    Returns:
        How many of its files were scored.
    """
    from medvae.data.staging import read_bytes, write_bytes

    entries = json.loads(read_bytes(f"{staging}/batch-{index:06d}.json"))
    screener = Screener.load(model_dir, cfg)
    records, batch = screen_files(screener, [(e[2], e[3]) for e in entries])
    staged = [{**r.to_dict(), "file": e[1], "slot": e[0]} for e, r in zip(entries, records, strict=True)]
    write_bytes(f"{staging}/records-{index:06d}.json", json.dumps(staged).encode())
    if heatmaps:
        # Raw maps, not PNGs: the PNGs share one colour scale over the whole run, known only at merge.
        buf = io.BytesIO()
        np.savez(buf, images=batch, maps=screener.heatmaps(batch) if len(batch) else batch)
        write_bytes(f"{staging}/maps-{index:06d}.npz", buf.getvalue())
    return sum(r.status == "scored" for r in records)


def merge_screen(
    staging: str, out_csv: Path | None, heatmaps_dir: Path | None, *, cleanup: bool = True
) -> ScreenResult:
    """Merge every staged batch into the same CSV and heat maps that :func:`screen_job` writes.

    Raises:
        RuntimeError: when a batch has no output (its task never finished).
    """
    from medvae.data.staging import read_bytes, remove_tree

    plan = json.loads(read_bytes(f"{staging}/plan.json"))
    staged: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for n in range(int(plan["batches"])):
        try:
            staged += json.loads(read_bytes(f"{staging}/records-{n:06d}.json"))
            if heatmaps_dir is not None:
                with np.load(io.BytesIO(read_bytes(f"{staging}/maps-{n:06d}.npz"))) as z:
                    images.append(z["images"])
                    maps.append(z["maps"].astype(np.float32))
        except OSError as exc:
            raise RuntimeError(f"batch {n} of {staging} has no output ({exc}); re-run the screening") from exc
    if len(staged) != int(plan["files"]):
        raise RuntimeError(f"{staging}: {len(staged)} of {plan['files']} files have a result")
    staged.sort(key=lambda r: r.pop("slot"))
    records = [ScreenRecord(**r) for r in staged]
    imgs = np.concatenate(images) if images else None
    res = write_outputs(records, out_csv, heatmaps_dir, imgs, np.concatenate(maps) if maps else None)
    if cleanup:
        remove_tree(staging)
    return res


def recalibrate_job(
    model_dir: Path, sources: Sequence[Path], *, fpr: float | None = None
) -> RecalibrationResult:
    """Set a model's anomaly thresholds on a site's own normal scans, in place (the model's hash changes).

    The scans are prepared like the model's training images; files that cannot be read are listed and
    left out. The latent reference the scores are measured against is unchanged.
    """
    from medvae.anomaly.calibration import (
        calibration_warnings,
        fpr_interval,
        load_calibration,
        recalibrate,
        site_shift_warnings,
    )
    from medvae.data.walk import iter_files
    from medvae.vae.artifacts import SIGNATURE, model_hash, write_json, write_tensors

    screener = Screener.load(model_dir)
    records, batch = screen_files(screener, [(str(p), err) for p, err in iter_files(list(sources))])
    before = load_calibration(model_dir)
    cal = recalibrate(screener.loaded.model, before, batch, fpr=fpr)
    # The share a screen flagged before recalibrating: the old threshold or the latent guard, on the
    # same scans (the records were scored with the old calibration).
    flags = [float(r.flagged) for r in records if r.status == "scored"]
    flagged_before = float(np.mean(flags)) if flags else 0.0
    meta, tensors = cal.to_files()
    write_tensors(model_dir, "calibration.safetensors", tensors)
    write_json(model_dir, "calibration.json", {**meta, "recalibrated_on": len(batch)})
    # The training store's signature no longer matches the new thresholds, and this job has no key:
    # the directory is now unsigned (and says so), never signed with a stale signature.
    signed = (Path(model_dir) / SIGNATURE).is_file()
    (Path(model_dir) / SIGNATURE).unlink(missing_ok=True)
    unsigned = ["the model is no longer signed by its training store (recalibration changed it)"]
    return RecalibrationResult(
        records=tuple(records),
        threshold_before=float(before.threshold),
        threshold=float(cal.threshold),
        fpr=cal.fpr,
        fpr_interval=fpr_interval(cal.n_val, cal.fpr),
        model_hash=model_hash(model_dir),
        flagged_before=flagged_before,
        warnings=tuple(calibration_warnings(cal) + site_shift_warnings(flagged_before, len(batch)))
        + tuple(unsigned if signed else ()),
    )
