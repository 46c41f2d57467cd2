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

from medvae.anomaly.calibration import Calibration, recalibrate
from medvae.eval.data import EvalData, ShiftSplit
from medvae.eval.metrics import proportion
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
        local_normals: held-out-batch normals the threshold was recalibrated on (0: not done).
        recalibrated_threshold: the threshold they give (None when not done).
        recalibrated_fpr: its rate on the other held-out-batch normals.
        recalibrated_sensitivity: the share of test abnormals it flags.
    """

    held_out: tuple[str, ...]
    fpr_by_batch: dict[str, dict[str, Any]]
    new_cohort_fpr: dict[str, Any]
    local_normals: int
    recalibrated_threshold: float | None
    recalibrated_fpr: dict[str, Any]
    recalibrated_sensitivity: float | None

    def metrics(self) -> dict[str, Any]:
        """The JSON figures."""
        return {
            "held_out": list(self.held_out),
            "fpr_by_batch": self.fpr_by_batch,
            "new_cohort_fpr": self.new_cohort_fpr,
            "local_normals": self.local_normals,
            "recalibrated_threshold": self.recalibrated_threshold,
            "recalibrated_fpr": self.recalibrated_fpr,
            "recalibrated_sensitivity": self.recalibrated_sensitivity,
        }


def _rate(flags: np.ndarray) -> dict[str, Any]:
    return proportion(int(flags.sum()), len(flags))


def check_cohort(
    model: ConvVAE, cal: Calibration, ed: EvalData, shift: ShiftSplit, test_scores: np.ndarray
) -> CohortCheck:
    """The stored and the recalibrated threshold on the shift-aware split's unseen normals.

    Args:
        model: the anomaly VAE trained on the shift-aware split's training normals.
        cal: its calibration (on the split's in-cohort val normals).
        ed: the prepared data.
        shift: the shift-aware split.
        test_scores: the calibrated score of every test image of ``shift.split`` (in its order).
    """
    sp = shift.split
    score_at = dict(zip(sp.test.tolist(), test_scores.tolist(), strict=True))
    normal = sp.test[sp.test_y == 0]
    batch = shift.batch[normal]
    flags = test_scores[sp.test_y == 0] > cal.threshold
    by_batch = {(b or DEFAULT_BATCH): _rate(flags[batch == b]) for b in sorted(set(batch.tolist()))}
    new = np.isin(batch, shift.held_out)
    recal_t, recal_fpr, recal_sens = None, proportion(0, 0), None
    if len(shift.local_normals):
        recal = recalibrate(model, cal, ed.x[shift.local_normals])
        recal_t = float(recal.threshold)
        unseen = np.array([score_at[i] for i in shift.unseen_normals.tolist()], dtype=np.float64)
        recal_fpr = _rate(unseen > recal_t)
        abnormal = test_scores[sp.test_y == 1]
        recal_sens = float((abnormal > recal_t).mean()) if len(abnormal) else None
    return CohortCheck(
        held_out=shift.held_out,
        fpr_by_batch=by_batch,
        new_cohort_fpr=_rate(flags[new]),
        local_normals=len(shift.local_normals),
        recalibrated_threshold=recal_t,
        recalibrated_fpr=recal_fpr,
        recalibrated_sensitivity=recal_sens,
    )


def summarise_cohort(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of the rates of :meth:`CohortCheck.metrics` (``per_seed``: their dicts)."""
    from medvae.eval.metrics import summarise

    batches = sorted({b for r in per_seed for b in r["fpr_by_batch"]})
    return {
        "held_out": per_seed[0]["held_out"],
        "new_cohort_fpr": summarise([r["new_cohort_fpr"]["value"] for r in per_seed]),
        "recalibrated_fpr": summarise([r["recalibrated_fpr"]["value"] for r in per_seed]),
        "recalibrated_sensitivity": summarise([r["recalibrated_sensitivity"] for r in per_seed]),
        "local_normals": per_seed[0]["local_normals"],
        "fpr_by_batch": {
            b: summarise([r["fpr_by_batch"].get(b, {}).get("value") for r in per_seed]) for b in batches
        },
    }
