"""Does the calibrated threshold hold on a new cohort? Its FPR on the shift-aware split's unseen normals.

The threshold is set on in-cohort validation normals. On the shift-aware split
(:func:`medvae.eval.data.shift_split`) the test normals come from acquisition batches the model and its
calibration never saw, so their false-positive rate is the one a new site would meet. Part of those
normals then plays the site's own normals: the threshold is recalibrated on them exactly as
``medvae recalibrate`` does (:func:`medvae.anomaly.calibration.recalibrate`), and the rest measure the
recalibrated threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medvae.anomaly.calibration import Calibration, recalibrate, threshold_at_fpr
from medvae.eval.data import EvalData, ShiftSplit
from medvae.eval.metrics import proportion, summarise
from medvae.vae.model import ConvVAE

DEFAULT_BATCH = "(default batch)"


@dataclass(frozen=True)
class CohortCheck:
    """The threshold on unseen normals of the shift-aware split (one seed).

    Attributes:
        held_out: the batches held out whole.
        fpr_by_batch: per acquisition batch of the test normals, the rate at the stored threshold
            (:func:`medvae.eval.metrics.proportion`: value, k, n, 95 % Clopper-Pearson interval).
        new_cohort_fpr: the same over every test normal of the held-out batches.
        local_normals: new-cohort normals each draw recalibrates on (0: not done).
        recalibrated_threshold: the first draw's threshold, set by
            :func:`medvae.anomaly.calibration.recalibrate` (None when not done).
        recalibrated_fpr: the first draw's rate on the other new-cohort normals.
        draws: how many draws of local normals were made.
        recalibrated_fpr_draws: the rate of every draw (a site's rate depends on its normals).
        recalibrated_sensitivity: the mean, over draws, share of test abnormals flagged.
    """

    held_out: tuple[str, ...]
    fpr_by_batch: dict[str, dict[str, Any]]
    new_cohort_fpr: dict[str, Any]
    local_normals: int
    recalibrated_threshold: float | None
    recalibrated_fpr: dict[str, Any]
    draws: int = 0
    recalibrated_fpr_draws: tuple[float, ...] = ()
    recalibrated_sensitivity: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The JSON figures; ``recalibrated_fpr_mean`` and its 5-95 % range summarise the draws."""
        d = np.asarray(self.recalibrated_fpr_draws, dtype=np.float64)
        return {
            "held_out": list(self.held_out),
            "fpr_by_batch": self.fpr_by_batch,
            "new_cohort_fpr": self.new_cohort_fpr,
            "local_normals": self.local_normals,
            "recalibrated_threshold": self.recalibrated_threshold,
            "recalibrated_fpr": self.recalibrated_fpr,
            "draws": self.draws,
            "recalibrated_fpr_mean": float(d.mean()) if d.size else None,
            "recalibrated_fpr_range90": [float(x) for x in np.quantile(d, [0.05, 0.95])] if d.size else None,
            "recalibrated_sensitivity": self.recalibrated_sensitivity,
        }


def _rate(flags: np.ndarray) -> dict[str, Any]:
    return proportion(int(flags.sum()), len(flags))


def check_cohort(
    model: ConvVAE,
    cal: Calibration,
    ed: EvalData,
    shift: ShiftSplit,
    test_scores: np.ndarray,
    *,
    seed: int = 0,
    draws: int = 1,
) -> CohortCheck:
    """The stored and the recalibrated threshold on the shift-aware split's unseen normals.

    Each draw takes ``shift.local_count`` new-cohort normals (whole patients) as the site's own, sets
    the threshold on them and measures it on the rest. The first draw goes through
    :func:`medvae.anomaly.calibration.recalibrate`, the code behind ``medvae recalibrate``; the others
    take the same quantile of the same scores, which needs no new forward pass.

    Args:
        model: the anomaly VAE trained on the shift-aware split's training normals.
        cal: its calibration (on the split's in-cohort val normals).
        ed: the prepared data.
        shift: the shift-aware split.
        test_scores: the calibrated score of every test image of ``shift.split`` (in its order).
        seed: the model seed (draws differ between seeds).
        draws: draws of local normals.
    """
    sp = shift.split
    score_at = np.full(len(shift.batch), np.nan)  # by position in the data: draws index it directly
    score_at[sp.test] = test_scores
    normal = sp.test[sp.test_y == 0]
    batch = shift.batch[normal]
    flags = test_scores[sp.test_y == 0] > cal.threshold
    by_batch = {(b or DEFAULT_BATCH): _rate(flags[batch == b]) for b in sorted(set(batch.tolist()))}
    first_t, first_fpr, rates, sens = None, proportion(0, 0), [], []
    abnormal = test_scores[sp.test_y == 1]
    for r in range(draws if shift.local_count else 0):
        local, unseen = shift.draw(seed * 1000 + r)
        if r == 0:
            t = float(recalibrate(model, cal, ed.x[local]).threshold)
        else:
            t = threshold_at_fpr(score_at[local], cal.fpr)
        flagged = score_at[unseen] > t
        if r == 0:
            first_t, first_fpr = t, _rate(flagged)
        rates.append(float(flagged.mean()))
        sens.append(float((abnormal > t).mean()) if len(abnormal) else float("nan"))
    return CohortCheck(
        held_out=shift.held_out,
        fpr_by_batch=by_batch,
        new_cohort_fpr=_rate(flags[np.isin(batch, shift.held_out)]),
        local_normals=shift.local_count,
        recalibrated_threshold=first_t,
        recalibrated_fpr=first_fpr,
        draws=len(rates),
        recalibrated_fpr_draws=tuple(rates),
        recalibrated_sensitivity=float(np.nanmean(sens)) if sens and len(abnormal) else None,
    )


def summarise_cohort(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of the rates of :meth:`CohortCheck.metrics` (``per_seed``: their dicts)."""
    batches = sorted({b for r in per_seed for b in r["fpr_by_batch"]})
    return {
        "held_out": per_seed[0]["held_out"],
        "new_cohort_fpr": summarise([r["new_cohort_fpr"]["value"] for r in per_seed]),
        "recalibrated_fpr": summarise([r["recalibrated_fpr_mean"] for r in per_seed]),
        "draws": per_seed[0]["draws"],
        "recalibrated_sensitivity": summarise([r["recalibrated_sensitivity"] for r in per_seed]),
        "local_normals": per_seed[0]["local_normals"],
        "fpr_by_batch": {
            b: summarise([r["fpr_by_batch"].get(b, {}).get("value") for r in per_seed]) for b in batches
        },
    }
