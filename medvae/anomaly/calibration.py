"""Anomaly thresholds calibrated on held-out normal images, percentiles among normals, and screening."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medvae.anomaly.stats import DEFAULT_SCORE, SCORES, LatentStats, fit_latent_stats, score_batch
from medvae.engine.inference import Device, ImageBatch, Labels
from medvae.vae.model import ConvVAE

_CALIBRATION_FORMAT = "medvae.calibration/1"


@dataclass(eq=False)
class Calibration:
    """An anomaly threshold calibrated on held-out normal images.

    Attributes:
        score: the primary score, one of :data:`SCORES`.
        threshold: images with ``score > threshold`` are flagged.
        fpr: the target false-positive rate on normals.
        normal_scores: the held-out normal images' primary scores, sorted ascending (for percentiles).
        stats: the latent reference the Mahalanobis score needs.
        n_val: how many held-out normals the threshold came from.
        recon_kind: the reconstruction likelihood the recon/elbo scores were computed with.
        default_label: for a conditional model, the label index new scans are scored against.
        by_score: the held-out normals' sorted scores for every score in :data:`SCORES`, so that screening
            can flag by another score than the primary one (see :meth:`for_score`).
        mean_image: the mean of the training images, float64 (H, W) in [0, 1]: the neutral fill of the
            occlusion heat maps and the reference of their lung mask (empty for old calibrations).
        local: whether the thresholds were set on a site's own normals (:func:`recalibrate`) rather than
            on held-out normals of the training cohort.
        roi: where the low-pass error counts, boolean (H, W): the lung fields of the mean training image
            (:func:`medvae.anomaly.localisation.region_of_interest`), all True when none were found,
            empty (the whole image) for old calibrations.
    """

    score: str
    threshold: float
    fpr: float
    normal_scores: np.ndarray
    stats: LatentStats
    n_val: int
    recon_kind: Literal["bce", "mse"] = "bce"
    default_label: int | None = None
    by_score: dict[str, np.ndarray] = field(default_factory=dict)
    mean_image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    local: bool = False
    roi: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))

    @property
    def roi_is_lungs(self) -> bool:
        """Whether the low-pass error counts only a lung region (not the whole image)."""
        return bool(self.roi.size) and not bool(self.roi.all())

    def for_score(self, name: str | None) -> Calibration:
        """This calibration with ``name`` as the flagging score (same normals, same target FPR).

        Args:
            name: one of :data:`SCORES`; None: the score the model was calibrated for.

        Raises:
            ValueError: when the calibration holds no held-out scores for ``name``.
        """
        if name is None or name == self.score:
            return self
        if name not in self.by_score:
            raise ValueError(
                f"this model was calibrated for {self.score!r} only, not {name!r}: retrain it (medvae train) "
                f"to calibrate every score, or screen with score={self.score}"
            )
        normal = self.by_score[name]
        return replace(self, score=name, normal_scores=normal, threshold=threshold_at_fpr(normal, self.fpr))

    def to_files(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Split into JSON metadata and float64 tensors (e.g. calibration.json + calibration.safetensors).

        Returns:
            ``(metadata, tensors)``: plain JSON types, and contiguous CPU tensors that own their memory.
        """
        meta: dict[str, Any] = {
            "format": _CALIBRATION_FORMAT,
            "score": self.score,
            "threshold": float(self.threshold),
            "fpr": float(self.fpr),
            "n_val": int(self.n_val),
            "recon_kind": self.recon_kind,
            "default_label": None if self.default_label is None else int(self.default_label),
            "latent_dim": int(self.stats.mean.shape[0]),
            "shrinkage": float(self.stats.shrinkage),
            "n_train": int(self.stats.n_images),
            "cohort": "local" if self.local else "training",
            "roi": "lungs" if self.roi_is_lungs else "whole image",
        }

        def t(a: np.ndarray) -> torch.Tensor:
            # clone(): the tensors must not alias this object's arrays, or saving code could mutate them.
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).clone()

        tensors = {
            "normal_scores": t(self.normal_scores),
            "stats_mean": t(self.stats.mean),
            "stats_precision": t(self.stats.precision),
            **{f"normal_scores.{k}": t(v) for k, v in self.by_score.items()},
            **({"mean_image": t(self.mean_image)} if self.mean_image.size else {}),
            **({"roi": t(self.roi)} if self.roi.size else {}),
        }
        return meta, tensors

    @classmethod
    def from_files(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Calibration:
        """Rebuild a calibration from the output of :meth:`to_files`.

        Raises:
            ValueError: for an unknown format, a missing tensor or inconsistent shapes.
        """
        if meta.get("format") != _CALIBRATION_FORMAT:
            raise ValueError(f"not a {_CALIBRATION_FORMAT} calibration: format={meta.get('format')!r}")
        missing = {"normal_scores", "stats_mean", "stats_precision"} - set(tensors)
        if missing:
            raise ValueError(f"calibration tensors missing: {sorted(missing)}")

        def a(name: str) -> np.ndarray:
            return np.asarray(tensors[name].detach().cpu().to(torch.float64).numpy(), dtype=np.float64).copy()

        mean, precision, normal = a("stats_mean"), a("stats_precision"), a("normal_scores")
        d = int(meta["latent_dim"])
        if mean.shape != (d,) or precision.shape != (d, d):
            raise ValueError(f"calibration stats have shapes {mean.shape}, {precision.shape}; latent_dim={d}")
        if normal.ndim != 1 or normal.shape[0] != int(meta["n_val"]) or np.any(np.diff(normal) < 0):
            raise ValueError("calibration normal_scores must be a sorted 1-D array of n_val scores")
        if meta["score"] not in SCORES or meta["recon_kind"] not in ("bce", "mse"):
            raise ValueError(f"unknown score {meta['score']!r} or recon_kind {meta['recon_kind']!r}")
        default = meta.get("default_label")
        by_score = {k.split(".", 1)[1]: a(k) for k in tensors if k.startswith("normal_scores.")}
        return cls(
            score=str(meta["score"]),
            threshold=float(meta["threshold"]),
            fpr=float(meta["fpr"]),
            normal_scores=normal,
            stats=LatentStats(
                mean=mean,
                precision=precision,
                shrinkage=float(meta.get("shrinkage", 0.0)),
                n_images=int(meta.get("n_train", 0)),
            ),
            n_val=int(meta["n_val"]),
            recon_kind=meta["recon_kind"],
            default_label=None if default is None else int(default),
            by_score={k: v for k, v in by_score.items() if k in SCORES},
            mean_image=a("mean_image") if "mean_image" in tensors else np.zeros((0, 0)),
            # Older files say only how many local normals a recalibration used.
            local=meta.get("cohort") == "local" or "recalibrated_on" in meta,
            roi=a("roi") > 0.5 if "roi" in tensors else np.zeros((0, 0), dtype=bool),
        )


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of normal scores, interpolation ``"higher"``.

    "higher" picks an observed score at or above the exact quantile position, so at most
    ``fpr`` of these normals score strictly above the threshold (linear interpolation could land
    between two scores and flag one more).
    """
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - fpr, method="higher"))


def calibrate(
    model: ConvVAE,
    train_images: ImageBatch,
    val_normal_images: ImageBatch,
    *,
    train_labels: Labels = None,
    val_labels: Labels = None,
    score: str = DEFAULT_SCORE,
    fpr: float = 0.05,
    recon_kind: Literal["bce", "mse"] = "bce",
    default_label: int | None = None,
    batch_size: int = 256,
    device: Device = None,
) -> Calibration:
    """Fit latent statistics on training images and set the threshold on held-out normal images.

    Args:
        model: the trained VAE.
        train_images: the images the model was trained on (the latent reference).
        val_normal_images: held-out normal images, never seen in training (the threshold).
        train_labels: label indices of ``train_images`` for a conditional model.
        val_labels: label indices of ``val_normal_images`` for a conditional model.
        score: the primary score, one of :data:`SCORES`.
        fpr: the share of held-out normals allowed above the threshold, in (0, 1).
        recon_kind: the reconstruction likelihood used in training.
        default_label: for a conditional model, the label index to score unlabelled images against
            (normally the normal class); stored so :func:`screen` uses it for new scans.
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        The calibration; see :func:`threshold_at_fpr` for how the threshold is chosen.

    Raises:
        ValueError: for an unknown score, an fpr outside (0, 1) or no validation images.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    if len(val_normal_images) < 1:
        raise ValueError("calibrate needs at least one held-out normal image")
    from medvae.anomaly.localisation import region_of_interest

    stats = fit_latent_stats(
        model, train_images, train_labels, default_label=default_label, batch_size=batch_size, device=device
    )
    mean_image = _mean_image(train_images)
    roi = region_of_interest(mean_image)
    val = score_batch(
        model,
        val_normal_images,
        val_labels,
        stats=stats,
        recon_kind=recon_kind,
        roi=roi,
        default_label=default_label,
        batch_size=batch_size,
        device=device,
    )
    by_score = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in val.items()}
    normal = by_score[score]
    return Calibration(
        score=score,
        threshold=threshold_at_fpr(normal, fpr),
        fpr=float(fpr),
        normal_scores=normal,
        stats=stats,
        n_val=len(normal),
        recon_kind=recon_kind,
        default_label=default_label,
        by_score=by_score,
        mean_image=mean_image,
        roi=roi,
    )


def _mean_image(images: ImageBatch) -> np.ndarray:
    """The mean training image in [0, 1], accumulated in chunks (a store version may be large)."""
    from medvae.engine.inference import as_float_batch

    total, n = None, 0
    for s in range(0, len(images), 1024):
        x = as_float_batch(images[s : s + 1024]).double().sum(dim=0)[0]
        total = x if total is None else total + x
        n += min(1024, len(images) - s)
    return (total / max(n, 1)).cpu().numpy() if total is not None else np.zeros((0, 0))


def percentile_among_normals(scores: np.ndarray, cal: Calibration) -> np.ndarray:
    """The share (0..100) of held-out normal images whose score is <= each given score.

    Args:
        scores: primary scores, any shape.
        cal: the calibration holding the sorted normal scores.

    Returns:
        Float64 percentiles of the same shape; 100 at or above the largest normal score.
    """
    s = np.asarray(scores, dtype=np.float64)
    rank = np.searchsorted(cal.normal_scores, s, side="right")
    return 100.0 * rank.astype(np.float64) / max(len(cal.normal_scores), 1)


def unlike_training(mahalanobis_scores: np.ndarray, cal: Calibration, factor: float) -> np.ndarray:
    """Whether each scan's latent distance exceeds ``factor`` times the largest held-out normal's.

    The low-pass error only asks whether the lung fields match their reconstruction; a blank frame, noise
    or another body part can be reconstructed well enough to pass it. Such scans sit far outside the
    normals' latent distribution, which the Mahalanobis distance measures. At 1.5 x the largest normal's
    distance no held-out normal is flagged by construction, and on kermany_train's new acquisition batch
    0.3-1.2 % of normals were (docs/quality.md), while every blank and noise image was.

    Args:
        mahalanobis_scores: the scans' ``mahalanobis`` scores.
        cal: the calibration (its held-out normals' Mahalanobis scores).
        factor: the multiple; 0 turns the check off.

    Returns:
        Boolean array of the scores' shape (all False when off or when no normals' scores are stored).
    """
    s = np.asarray(mahalanobis_scores, dtype=np.float64)
    normal = cal.by_score.get("mahalanobis", np.zeros(0))
    if factor <= 0 or not len(normal):
        return np.zeros(s.shape, dtype=bool)
    return np.asarray(s > factor * float(np.max(normal)), dtype=bool)


def screen(
    model: ConvVAE,
    images: ImageBatch,
    cal: Calibration,
    labels: Labels = None,
    device: Device = None,
    *,
    default_label: int | None = None,
    batch_size: int = 256,
    unlike_factor: float = 0.0,
) -> dict[str, np.ndarray]:
    """Score new images against a calibration and flag the unusual ones.

    For a conditional model, images without labels are scored against ``default_label`` or else the
    calibration's ``default_label`` (the normal class): "how unusual is this *as a normal scan*".

    Args:
        model: the trained VAE.
        images: see :func:`as_float_batch`.
        cal: from :func:`calibrate`.
        labels: label indices for a conditional model, when known.
        device: where to compute; None: the model's device.
        default_label: overrides ``cal.default_label``.
        batch_size: images per forward pass.
        unlike_factor: also flag scans :func:`unlike_training` by this factor (0: off).

    Returns:
        Every score in :data:`SCORES`, plus ``"score"`` (the primary one), ``"percentile"`` (among
        held-out normals, 0..100), ``"unlike"`` (bool, see :func:`unlike_training`) and ``"flag"``
        (bool, ``score > threshold`` or unlike).
    """
    label = cal.default_label if default_label is None else default_label
    out = score_batch(
        model,
        images,
        labels,
        stats=cal.stats,
        recon_kind=cal.recon_kind,
        roi=cal.roi,
        default_label=label,
        batch_size=batch_size,
        device=device,
    )
    primary = out[cal.score]
    out["score"] = primary
    out["percentile"] = percentile_among_normals(primary, cal)
    out["unlike"] = unlike_training(out["mahalanobis"], cal, unlike_factor)
    out["flag"] = (primary > cal.threshold) | out["unlike"]
    return out


# A threshold from fewer held-out normals than this cannot be trusted to its stated false-positive rate:
# with n normals the percentiles move in steps of 100/n %, and the rate's interval is wide.
FEW_NORMALS = 100


def fpr_interval(n_normals: int, fpr: float, confidence: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson interval of the false-positive rate a threshold can promise.

    A threshold set at the (1 - fpr) quantile of ``n_normals`` held-out normals passes about
    ``k = floor(n * fpr)`` of them; the exact binomial interval of ``k / n`` is how far the rate on new
    normals of the same population may plausibly lie from the target.

    Args:
        n_normals: held-out normals the threshold was calibrated on (>= 1).
        fpr: the target false-positive rate.
        confidence: the interval's coverage.

    Returns:
        ``(low, high)`` rates in [0, 1].
    """
    from scipy.stats import beta

    n = max(int(n_normals), 1)
    k = int(np.floor(n * fpr))
    a = (1.0 - confidence) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def calibration_warnings(cal: Calibration) -> list[str]:
    """What an operator must be told about a calibration: a threshold set on too few normals, and a
    low-pass error that found no lung fields to count."""
    out = []
    if cal.score == "lowpass_error" and cal.roi.size and not cal.roi_is_lungs:
        out.append(
            "no lung fields were found in the mean training image, so the lowpass_error score counts the "
            "whole image, where collimation edges and labels dominate it; it was measured on chest films "
            "(docs/quality.md)"
        )
    if cal.n_val >= FEW_NORMALS:
        return out
    low, high = fpr_interval(cal.n_val, cal.fpr)
    out.append(
        f"the anomaly threshold was calibrated on only {cal.n_val} held-out normals: percentiles move in "
        f"{100.0 / max(cal.n_val, 1):.1f} % steps and the false-positive rate it promises ({cal.fpr:.0%}) "
        f"may lie anywhere in {low:.1%}-{high:.1%} (95 % interval); calibrate on at least {FEW_NORMALS} "
        "normals (ingest more normal scans, or recalibrate on local normals)"
    )
    return out


def cohort_warnings(cal: Calibration) -> list[str]:
    """What screening with a threshold from the training cohort must say: its rate may not hold here.

    ``medvae evaluate`` measured it on Kermany's held-out acquisition batch: the lung low-pass score's
    threshold held there (3.8 % of its normals flagged against a 5 % target), the latent Mahalanobis
    score's did not (11 %), and an official test split from the same hospital flagged 23.5 % with the
    latter (docs/quality.md). One held batch is no guarantee for another site's scanners, so until the
    model is recalibrated on local normals the screen says so; afterwards there is nothing to say.
    """
    if cal.local:
        return []
    return [
        f"the threshold was set on normals of the training cohort; on another site's or scanner's normals "
        f"its false-positive rate may differ from the {cal.fpr:.0%} it promises (in medvae evaluate a new "
        "batch's normals were flagged at 3.8 % with the lung low-pass score, 11 % with the latent score): "
        "recalibrate on a few hundred local normal scans first (medvae recalibrate NORMALS --model MODEL_DIR)"
    ]


# Half a batch above the threshold cannot be the normals' false positives at any sensible target rate, and
# below 20 scans a share says little. Driving the CLI, a paediatric Kermany model flagged all 200 adult
# NIH chest X-rays (AUROC 0.54 there): a screen that says only "flagged 200" hides that it is blind.
UNLIKE_SHARE = 0.5
MIN_SHARE_SCANS = 20


def _mostly_flagged(share: float, n: int) -> bool:
    """Whether ``share`` of ``n`` scans above a threshold is too many to be its normals' false positives."""
    return n >= MIN_SHARE_SCANS and share >= UNLIKE_SHARE


def flagged_share_warnings(scored: int, flagged: int, fpr: float) -> list[str]:
    """What a screening run must say when it flags most of its batch.

    Args:
        scored: scans scored in the run.
        flagged: of those, how many scored above the threshold.
        fpr: the false-positive rate the threshold promises on normals.

    Returns:
        One warning when at least :data:`MIN_SHARE_SCANS` scans were scored and at least
        :data:`UNLIKE_SHARE` of them flagged; otherwise none.
    """
    if not _mostly_flagged(flagged / max(scored, 1), scored):
        return []
    return [
        f"flagged {flagged} of {scored} scans ({flagged / scored:.0%}), against the {fpr:.0%} of normals the "
        "threshold promises: either the batch is mostly abnormal, or its scans are unlike the training "
        "cohort (another age group, view, scanner or modality), and the score cannot tell the two apart; "
        "check the model on labelled local scans (medvae evaluate) before relying on its flags"
    ]


def site_shift_warnings(flagged_before: float, n: int) -> list[str]:
    """What recalibrating must say when the old calibration flagged most of the site's own normals.

    A new threshold then holds the false-positive rate, but only by moving far above the training
    cohort's, and nothing measures how many abnormal scans still pass it.

    Args:
        flagged_before: the share of the local normals a screen flagged before (the threshold they
            replace, or the latent guard).
        n: how many local normals there were.

    Returns:
        One warning when at least :data:`MIN_SHARE_SCANS` normals were used and at least
        :data:`UNLIKE_SHARE` of them had been flagged; otherwise none.
    """
    if not _mostly_flagged(flagged_before, n):
        return []
    return [
        f"the old calibration flagged {flagged_before:.0%} of these normal scans: this site's scans are "
        "unlike the training cohort (another age group, view, scanner or modality). The new threshold "
        "holds the false-positive rate, but how many abnormal scans it still flags here is unmeasured: "
        "check the model on labelled local scans (medvae evaluate) before relying on its flags"
    ]


def load_calibration(model_dir: Path) -> Calibration:
    """The calibration stored in a model directory (``calibration.json`` + ``.safetensors``)."""
    from medvae.vae.artifacts import read_json, read_tensors

    return Calibration.from_files(
        read_json(model_dir, "calibration.json"), read_tensors(model_dir, "calibration.safetensors")
    )


def recalibrate(
    model: ConvVAE, cal: Calibration, local_normals: ImageBatch, *, fpr: float | None = None
) -> Calibration:
    """The same model's calibration, with its thresholds set on a site's own normal scans.

    Every site's scanners differ, and a threshold set on another cohort's normals does not promise its
    false-positive rate on this one. The latent reference (mean, precision) and the mean image stay;
    every score's held-out normal distribution, and so every threshold and percentile, is replaced.

    Args:
        model: the trained VAE the calibration belongs to.
        cal: its current calibration.
        local_normals: normal scans of the site, prepared like the training images (uint8 (N, H, W)).
        fpr: the target false-positive rate (the current one when None).

    Returns:
        The new calibration.

    Raises:
        ValueError: with fewer than 2 local normals.
    """
    if len(local_normals) < 2:
        raise ValueError(f"recalibration needs at least 2 local normal scans, got {len(local_normals)}")
    rate = cal.fpr if fpr is None else float(fpr)
    if not 0.0 < rate < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {rate}")
    val = score_batch(
        model,
        local_normals,
        None,
        stats=cal.stats,
        recon_kind=cal.recon_kind,
        roi=cal.roi,
        default_label=cal.default_label,
    )
    by_score = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in val.items()}
    normal = by_score[cal.score]
    return replace(
        cal,
        threshold=threshold_at_fpr(normal, rate),
        fpr=rate,
        normal_scores=normal,
        n_val=len(normal),
        by_score=by_score,
        local=True,
    )
