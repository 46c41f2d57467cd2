"""Shortcut check: how much of a score's ranking rests on a global image property, here sharpness.

A detector can separate the classes through a property that differs between them for reasons beside the
finding: exposure, processing, the patients' age, the film's sharpness. On Kermany's training data the
pneumonia images are smoother than the normals, so smooth that the sharpness alone ranks them at AUROC 0.83,
and the highest-scoring normals of an unseen batch are its smoothest ones. Comparing normals and abnormals
only within the same sharpness stratum gives the AUROC a score would keep on data where the classes do not
differ in sharpness: 0.88-0.89 for the shipped score, against 0.945 unmatched (docs/quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from medvae.synth.detail import sharpness_per_image

# Deciles: enough strata that little sharpness difference is left inside one, few enough that each holds
# both classes. Smaller test sets get fewer, at least MIN_PER_STRATUM images in each.
STRATA = 10
MIN_PER_STRATUM = 50


def sharpness(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference between neighbouring pixels of each image, in [0, 1] intensity units.

    Args:
        images: (N, H, W) or (N, 1, H, W), uint8 (0..255) or float in [0, 1].

    Returns:
        (N,) float64: 0 for a flat image, 1 for a black-and-white checkerboard.
    """
    x = np.asarray(images)
    to_grey = 1.0 if x.dtype == np.uint8 else 255.0  # sharpness_per_image measures on the 0-255 scale
    grey = x.reshape(len(x), x.shape[-2], x.shape[-1]).astype(np.float64) * to_grey
    return np.asarray(sharpness_per_image(grey) / 255.0, dtype=np.float64)


def strata_for(n: int) -> int:
    """How many quantile strata a test set of ``n`` images gets (1: too small to stratify)."""
    return int(max(1, min(STRATA, n // MIN_PER_STRATUM)))


def stratified_auroc(y: np.ndarray, score: np.ndarray, covariate: np.ndarray, strata: int) -> float | None:
    """AUROC over the normal-abnormal pairs that share a quantile stratum of ``covariate``.

    Each stratum's AUROC is weighted by its number of pairs (normals × abnormals), so this is the share of
    correctly ordered pairs among within-stratum pairs, ties counting half.

    Args:
        y: 0 (normal) or 1 (abnormal) per image.
        score: higher means more abnormal.
        covariate: the property to match on (e.g. :func:`sharpness`).
        strata: the number of quantile bins of ``covariate``.

    Returns:
        The matched AUROC, or None when no stratum holds both classes.
    """
    y, score, covariate = np.asarray(y), np.asarray(score, np.float64), np.asarray(covariate, np.float64)
    edges = np.quantile(covariate, np.linspace(0.0, 1.0, strata + 1))
    which = np.clip(np.searchsorted(edges, covariate, side="right") - 1, 0, strata - 1)
    weighted, pairs = 0.0, 0
    for k in range(strata):
        inside = which == k
        n1 = int(y[inside].sum())
        n0 = int(inside.sum()) - n1
        if n0 and n1:
            weighted += float(roc_auc_score(y[inside], score[inside])) * n0 * n1
            pairs += n0 * n1
    return weighted / pairs if pairs else None


@dataclass(frozen=True)
class SharpnessCheck:
    """How a score ranks the test images once their sharpness is matched.

    Attributes:
        alone: AUROC of the bluntness (minus sharpness) alone as a detector; 0.5 means the classes are
            equally sharp, and the further from 0.5, the more a detector can lean on it.
        matched: the score's AUROC within sharpness strata (:func:`stratified_auroc`); None when no
            stratum holds both classes.
        strata: the number of strata.
    """

    alone: float | None
    matched: float | None
    strata: int

    def metrics(self) -> dict[str, Any]:
        """The JSON part."""
        return {"alone_auroc": self.alone, "matched_auroc": self.matched, "strata": self.strata}


def check_sharpness(y: np.ndarray, score: np.ndarray, images: np.ndarray) -> SharpnessCheck:
    """The sharpness shortcut check of one scored test set (see the module docstring)."""
    y = np.asarray(y)
    sharp = sharpness(images)
    both = 0 < int(y.sum()) < len(y)
    alone = float(roc_auc_score(y, -sharp)) if both else None
    k = strata_for(len(y))
    matched = stratified_auroc(y, score, sharp, k) if both else None
    return SharpnessCheck(alone=alone, matched=matched, strata=k)
