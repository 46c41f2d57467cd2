"""The synthetic-data utility and privacy study, one seed at a time.

At each label fraction a conditional VAE is trained on a patient-grouped share of the labelled training
images and samples synthetic ones; the privacy filter drops near copies of its training images; and the
fixed :mod:`medvae.eval.classifier` CNN is trained on real, real + synthetic and synthetic only and
tested on the real test split. :func:`run_utility_seed` returns a :class:`UtilityRun` whose distance
arrays stay in memory for the figures; :meth:`FractionRun.metrics` is the JSON part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medvae.config import EvaluateConfig
from medvae.data.splits import grouped_subsample
from medvae.eval.anomaly import with_seed_device
from medvae.eval.data import EvalData
from medvae.eval.metrics import paired_differences, summarise

TRAINING_SETS = ("real", "real_synthetic", "synthetic")
PRIVACY_FIGURES = (
    "near_copy_share_before",
    "near_copy_share_after",
    "rejection_rate",
    "reference_test_q",
    "filter_threshold",
    "dcr_synthetic_median",
    "dcr_heldout_median",
)


@dataclass(eq=False)
class FractionRun:
    """One label fraction of one seed.

    Attributes:
        fraction: the share of labelled training images.
        n_real_train: real training images at this fraction.
        n_real_patients: their patients.
        auroc: test AUROC of the classifier per training set (None when a set has one class only).
        privacy: the near-copy figures.
        dcr_synthetic: each synthetic image's distance to its nearest generator-training image.
        dcr_heldout: the same for each real test image.
        kept: which synthetic images the privacy filter kept.
        samples: up to ``cfg.pictures`` unfiltered synthetic images per class (0, 1), for the report.
        seconds: ``{"generator_seconds", "classifier_seconds"}``.
    """

    fraction: float
    n_real_train: int
    n_real_patients: int
    auroc: dict[str, float | None]
    privacy: dict[str, Any]
    dcr_synthetic: np.ndarray
    dcr_heldout: np.ndarray
    kept: np.ndarray
    samples: dict[int, np.ndarray]
    seconds: dict[str, float]

    def metrics(self) -> dict[str, Any]:
        """The JSON figures of this fraction (no arrays)."""
        return {
            "n_real_train": self.n_real_train,
            "n_real_patients": self.n_real_patients,
            "auroc": self.auroc,
            "privacy": self.privacy,
            **self.seconds,
        }


@dataclass(eq=False)
class UtilityRun:
    """One seed of the utility study: its label fractions keyed as in metrics.json (``f"{fraction:g}"``)."""

    seed: int
    fractions: dict[str, FractionRun]

    def metrics(self) -> dict[str, Any]:
        """The JSON figures of this seed."""
        return {"seed": self.seed, "fractions": {k: f.metrics() for k, f in self.fractions.items()}}


def _synthesise(gen: Any, y_tr: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from medvae.synth.sample import sample_images

    synth: list[np.ndarray] = []
    synth_y: list[np.ndarray] = []
    for c in (0, 1):
        n_c = round(ratio * int((y_tr == c).sum()))
        if n_c > 0:
            synth.append(sample_images(gen, n_c, label_index=c, seed=seed + c))
            synth_y.append(np.full(n_c, c, dtype=np.int64))
    return np.concatenate(synth), np.concatenate(synth_y)


def _privacy(
    xs: np.ndarray, x_tr: np.ndarray, x_val: np.ndarray, x_test: np.ndarray, q: float, seed: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Near-copy figures, DCRs of the synthetic and the held-out test images, and the filter's keep mask."""
    from medvae.synth.privacy import nearest_neighbour_distances, privacy_filter, privacy_threshold

    d_val = nearest_neighbour_distances(x_val, x_tr)
    d_test = nearest_neighbour_distances(x_test, x_tr)
    reference = float(np.quantile(d_test, q))  # the criterion: held-out test real → train
    # The filter never sees the test split: the stricter of the pipeline's train-to-train quantile and the
    # same quantile of (held-out) val → train distances.
    thr_train = privacy_threshold(x_tr, q, seed=seed)
    thr = max(thr_train, float(np.quantile(d_val, q)))
    filt = privacy_filter(xs, x_tr, thr)
    keep, d_syn = filt.keep, filt.distances  # DCR of each synthetic image to the generator's training set
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
    return privacy, d_syn, d_test, keep


def _classifier_aurocs(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], ed: EvalData, seed: int, epochs: int, device: str
) -> dict[str, float | None]:
    """The fixed CNN trained on each set, tested on the real test split (same val and test for all)."""
    from sklearn.metrics import roc_auc_score

    from medvae.eval.classifier import predict_proba, train_classifier

    sp = ed.split
    x_val, y_val = ed.x[sp.val_all], ed.y01[sp.val_all]
    aurocs: dict[str, float | None] = {}
    for name, (xa, ya) in sets.items():
        if len(np.unique(ya)) < 2:
            aurocs[name] = None
            continue
        clf = train_classifier(xa, ya, x_val, y_val, seed=seed, epochs=epochs, device=device)
        aurocs[name] = float(roc_auc_score(ed.y01[sp.test], predict_proba(clf, ed.x[sp.test])[:, 1]))
    return aurocs


def run_fraction(
    ed: EvalData, cfg: EvaluateConfig, seed: int, fi: int, device: str, progress: bool
) -> FractionRun:
    """Generator, synthetic images, privacy filter and the three classifiers at label fraction ``fi``."""
    from medvae.engine.trainer import train_vae

    x, y01, sp = ed.x, ed.y01, ed.split
    frac = cfg.label_fractions[fi]
    # The subsample is part of the split (fixed by split_seed), not of the model seed.
    sub = grouped_subsample(ed.groups[sp.train_all], y01[sp.train_all].astype(str), frac, cfg.split_seed)
    tr = sp.train_all[sub]
    x_tr, y_tr = x[tr], y01[tr]
    t0 = time.perf_counter()
    gcfg = with_seed_device(cfg.generator, seed, device, conditional=True, num_classes=2)
    gen = train_vae(
        x_tr, y_tr, gcfg, val_images=x[sp.val_all], val_labels=y01[sp.val_all], progress=progress
    ).model.eval()
    gen_s = time.perf_counter() - t0
    xs, ys = _synthesise(gen, y_tr, cfg.synthetic_ratio, seed * 1000 + fi * 10)
    privacy, d_syn, d_test, keep = _privacy(xs, x_tr, x[sp.val_all], x[sp.test], cfg.privacy_quantile, seed)
    xk, yk = xs[keep], ys[keep]
    t1 = time.perf_counter()
    sets = {
        "real": (x_tr, y_tr),
        "real_synthetic": (np.concatenate([x_tr, xk]), np.concatenate([y_tr, yk])),
        "synthetic": (xk, yk),
    }
    aurocs = _classifier_aurocs(sets, ed, seed, cfg.classifier_epochs, device)
    return FractionRun(
        fraction=frac,
        n_real_train=len(tr),
        n_real_patients=len(set(ed.groups[tr].tolist())),
        auroc=aurocs,
        privacy=privacy,
        dcr_synthetic=d_syn,
        dcr_heldout=d_test,
        kept=keep,
        samples={c: xs[ys == c][: cfg.pictures] for c in (0, 1)},
        seconds={"generator_seconds": gen_s, "classifier_seconds": time.perf_counter() - t1},
    )


def log_line(seed: int, fr: FractionRun) -> str:
    """The one-line progress report of a fraction."""
    a, p, s = fr.auroc, fr.privacy, fr.seconds
    return (
        f"seed {seed} utility @ {fr.fraction:g}: real {a['real']}, real+syn {a['real_synthetic']}, "
        f"syn {a['synthetic']}; near copies {p['near_copy_share_before']:.3f} → "
        f"{p['near_copy_share_after']:.3f} ({s['generator_seconds']:.0f} s generator, "
        f"{s['classifier_seconds']:.0f} s classifiers)"
    )


def summarise_utility(runs: list[UtilityRun]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean ± sd over seeds per label fraction: the utility summary and the privacy summary.

    Utility: test AUROC per training set, TSTR / real (per seed, then averaged), and the paired
    difference real + synthetic − real (per seed).
    """
    u_summary: dict[str, Any] = {}
    p_summary: dict[str, Any] = {}
    for f in runs[0].fractions:
        per = [u.fractions[f] for u in runs]
        a = {k: [r.auroc[k] for r in per] for k in TRAINING_SETS}
        ratios = [s / r for s, r in zip(a["synthetic"], a["real"], strict=True) if s is not None and r]
        u_summary[f] = {
            **{k: summarise(a[k]) for k in TRAINING_SETS},
            "tstr_ratio": summarise(ratios),
            "real_synthetic_minus_real": paired_differences(a["real_synthetic"], a["real"]),
        }
        p_summary[f] = {k: summarise([r.privacy[k] for r in per]) for k in PRIVACY_FIGURES}
    return u_summary, p_summary
