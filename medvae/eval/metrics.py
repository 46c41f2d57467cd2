"""Evaluation metrics: AUROC/AUPRC and their curves, confusion counts, confidence intervals, summaries.

Abnormal (1) is always the positive class and a higher score always means "more abnormal".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

LEVEL = 0.95  # every interval in the report is a 95% interval


def finite(x: np.ndarray) -> np.ndarray:
    """Float64 copy with NaN -> 0 and ±inf -> ±1e300.

    KL or reconstruction scores of a badly trained model can overflow; ranking metrics need finite numbers.
    """
    return np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)


def binary_metrics(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of a score.

    Args:
        y_true: (N,) 0/1, both present.
        score: (N,) higher means more abnormal.

    Returns:
        ``{"auroc", "auprc"}``.
    """
    y = np.asarray(y_true).astype(int)
    s = finite(score)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}


def roc_points(y_true: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The ROC curve as a (2, K) array: false-positive rate, then sensitivity."""
    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), finite(score))
    return np.stack([fpr, tpr])


def pr_points(y_true: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The precision-recall curve as a (2, K) array: recall (sensitivity), then precision (PPV)."""
    precision, recall, _ = precision_recall_curve(np.asarray(y_true).astype(int), finite(score))
    return np.stack([recall, precision])


def bootstrap_auroc(
    y_true: np.ndarray, score: np.ndarray, n_boot: int, seed: int = 0, level: float = LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of the AUROC over a stratified bootstrap of the test images.

    Normals and abnormals are resampled separately (their counts stay fixed), so every replicate has both
    classes. The AUROC of a replicate is the Mann-Whitney statistic from average ranks, which equals
    :func:`sklearn.metrics.roc_auc_score` including ties, vectorised over replicates.

    Args:
        y_true: (N,) 0/1, both present.
        score: (N,) scores.
        n_boot: replicates; 0 gives None.
        seed: the resampling seed (the interval is reproducible).
        level: the coverage.

    Returns:
        ``(low, high)``, or None without replicates.
    """
    from scipy.stats import rankdata

    if n_boot < 1:
        return None
    y = np.asarray(y_true).astype(bool)
    s = finite(score)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    aucs: list[np.ndarray] = []
    for start in range(0, n_boot, 100):  # 100 replicates at a time keep the rank matrix small
        b = min(100, n_boot - start)
        rp = pos[rng.integers(0, len(pos), (b, len(pos)))]
        rn = neg[rng.integers(0, len(neg), (b, len(neg)))]
        ranks = rankdata(np.concatenate([rp, rn], axis=1), axis=1)
        u = ranks[:, : len(pos)].sum(axis=1) - len(pos) * (len(pos) + 1) / 2.0
        aucs.append(u / (len(pos) * len(neg)))
    a = np.concatenate(aucs)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(a, tail)), float(np.quantile(a, 1.0 - tail))


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion k/n.

    Raises:
        ValueError: unless 0 <= k <= n and n >= 1.
    """
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def proportion(k: int, n: int) -> dict[str, Any]:
    """``{"value", "k", "n", "ci95"}`` of k events in n trials (value and interval None for n = 0)."""
    if n == 0:
        return {"value": None, "k": 0, "n": 0, "ci95": None}
    return {"value": k / n, "k": int(k), "n": int(n), "ci95": list(clopper_pearson(k, n))}


def confusion(y_true: np.ndarray, flagged: np.ndarray) -> dict[str, int]:
    """Counts at a threshold: ``tn`` (normal, not flagged), ``fp``, ``fn`` (missed abnormal), ``tp``."""
    y = np.asarray(y_true).astype(bool)
    f = np.asarray(flagged).astype(bool)
    return {
        "tn": int((~y & ~f).sum()),
        "fp": int((~y & f).sum()),
        "fn": int((y & ~f).sum()),
        "tp": int((y & f).sum()),
    }


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values; None and NaN left out."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0, "min": None, "max": None, "values": []}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {
        "mean": float(v.mean()),
        "sd": sd,
        "n": int(v.size),
        "min": float(v.min()),
        "max": float(v.max()),
        "values": [float(x) for x in v],
    }


def paired_differences(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """:func:`summarise` of ``a[i] - b[i]`` over the pairs (seeds) where both exist.

    Pairing removes the seed-to-seed variation the two share (same split, same seed), so its sd is the
    honest spread of the difference, unlike combining the two marginal sds.
    """
    return summarise([x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None])


def fmt_msd(s: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± sd`` of a :func:`summarise` result, or ``n/a`` (also for a figure not measured: None)."""
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"
