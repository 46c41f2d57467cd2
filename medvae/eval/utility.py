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
from typing import TYPE_CHECKING, Any

import numpy as np

from medvae.config import EvaluateConfig
from medvae.data.splits import grouped_subsample
from medvae.eval.anomaly import with_seed_device
from medvae.eval.data import EvalData
from medvae.eval.metrics import paired_differences, summarise

if TYPE_CHECKING:
    from medvae.synth.sample import Sampling

TRAINING_SETS = ("real", "real_synthetic", "synthetic", "real_repeated")
SET_NAMES = {
    "real": "real",
    "real_synthetic": "real + synthetic",
    "synthetic": "synthetic only",
    "real_repeated": "real repeated (same size)",
}
GENERATION_FIGURES = ("fd", "precision", "recall", "label_fidelity")
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
        auroc: test AUROC of the classifier per training set (None when a set has one class only):
            ``real``, ``real_synthetic`` (the primary share), ``synthetic`` (TSTR), ``real_repeated`` (the
            real images repeated to the real + synthetic size: the same steps, no new images) and
            ``real_synthetic@R`` and ``synthetic@R`` for the other shares R of the sweep (TSTR at
            share 1 is the same-size comparison).
        sizes: the images in each training set.
        privacy: the near-copy figures.
        generation: FD, precision, recall and label fidelity (:mod:`medvae.eval.generation`) of every
            drawn image (``drawn``) and of those the filter kept (``kept``), in the real classifier's
            features; None where a set was too small.
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
    sizes: dict[str, int]
    privacy: dict[str, Any]
    generation: dict[str, Any]
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
            "sizes": self.sizes,
            "privacy": self.privacy,
            "generation": self.generation,
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


@dataclass(eq=False)
class Drawn:
    """Synthetic images drawn until the privacy filter kept enough of each label.

    Attributes:
        images: every image drawn, uint8 (M, H, W), in draw order.
        labels: the label each was drawn for (0/1).
        keep: which ones passed the privacy filter.
        distances: each image's RMS distance to its nearest generator-training image (its DCR).
        requested: the images asked for per label (at the largest synthetic share).
    """

    images: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    distances: np.ndarray
    requested: dict[int, int]

    def kept(self, ratio: float, real_counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The first ``round(ratio * real count)`` kept images of each label (fewer when the filter kept
        fewer): the sets of smaller shares are prefixes of the larger ones."""
        xs, ys = [], []
        for c, n_real in real_counts.items():
            idx = np.flatnonzero(self.keep & (self.labels == c))[: round(ratio * n_real)]
            xs.append(self.images[idx])
            ys.append(self.labels[idx])
        return np.concatenate(xs), np.concatenate(ys)


def _draw_kept(
    gen: Any,
    requested: dict[int, int],
    x_tr: np.ndarray,
    threshold: float,
    seed: int,
    max_draws: float,
    how: Sampling,
) -> Drawn:
    """Each label drawn until the privacy filter kept ``requested[c]`` images, or ``max_draws`` times as
    many were read (:func:`~medvae.synth.sample.sample_private`, as ``medvae augment`` draws), with the
    sampler and detail restoration ``how``."""
    from medvae.synth.sample import sample_private

    size = x_tr.shape[1:]
    parts = [(np.zeros((0, *size), np.uint8), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0))]
    for c, n_c in requested.items():
        if n_c <= 0:  # a class this subsample lacks: nothing to draw (sample_passing has no image shape)
            continue
        got = sample_private(
            gen,
            n_c,
            label_index=c,
            seed=seed + c,
            train=x_tr,
            threshold=threshold,
            max_draws=max_draws,
            sampler=how.sampler,
            detail=how.detail,
        )
        parts.append((got.images, np.full(got.read, c, dtype=np.int64), got.keep, got.distances))
    images, labels, keep, dist = (np.concatenate(a) for a in zip(*parts, strict=True))
    return Drawn(images, labels, keep, dist, dict(requested))


def _privacy_threshold(x_tr: np.ndarray, x_val: np.ndarray, q: float, seed: int) -> tuple[float, float]:
    """The filter's threshold and the train-to-train part of it.

    The filter never sees the test split: the stricter of the pipeline's train-to-train quantile and the
    same quantile of (held-out) val → train distances.
    """
    from medvae.synth.privacy import nearest_neighbour_distances, privacy_threshold

    thr_train = privacy_threshold(x_tr, q, seed=seed)
    return max(thr_train, float(np.quantile(nearest_neighbour_distances(x_val, x_tr), q))), thr_train


def _privacy(
    drawn: Drawn, x_tr: np.ndarray, x_test: np.ndarray, q: float, thr: tuple[float, float]
) -> tuple[dict[str, Any], np.ndarray]:
    """Near-copy figures over every drawn image, and the DCRs of the held-out test images."""
    from medvae.synth.privacy import nearest_neighbour_distances

    d_test = nearest_neighbour_distances(x_test, x_tr)
    reference = float(np.quantile(d_test, q))  # the criterion: held-out test real → train
    keep, d_syn = drawn.keep, drawn.distances
    privacy = {
        "reference_test_q": reference,
        "filter_threshold": thr[0],
        "threshold_train_to_train": thr[1],
        "near_copy_share_before": float((d_syn < reference).mean()),
        "near_copy_share_after": float((d_syn[keep] < reference).mean()) if keep.any() else 0.0,
        "rejection_rate": float(1.0 - keep.mean()) if len(keep) else 0.0,
        "dcr_synthetic_median": float(np.median(d_syn)),
        "dcr_heldout_median": float(np.median(d_test)),
        "dcr_synthetic_min_after": float(d_syn[keep].min()) if keep.any() else None,
        "n_requested": int(sum(drawn.requested.values())),
        "n_synthetic": len(d_syn),
        "n_kept": int(keep.sum()),
    }
    return privacy, d_test


def _repeated(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The real images repeated (then a seeded random remainder) up to ``n``: the control that gives the
    classifier as many steps as real + synthetic, with no new information."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.tile(np.arange(len(x)), n // len(x)), rng.permutation(len(x))[: n % len(x)]])
    return x[idx], y[idx]


def _train_sets(
    x_tr: np.ndarray, y_tr: np.ndarray, drawn: Drawn, ratios: tuple[float, ...], primary: float, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """real, real + synthetic at each share (the primary one unsuffixed), synthetic only, and real
    repeated to the primary real + synthetic size."""
    counts = {c: int((y_tr == c).sum()) for c in (0, 1)}
    xk, yk = drawn.kept(primary, counts)
    sets = {
        "real": (x_tr, y_tr),
        "real_synthetic": (np.concatenate([x_tr, xk]), np.concatenate([y_tr, yk])),
        "synthetic": (xk, yk),
        "real_repeated": _repeated(x_tr, y_tr, len(x_tr) + len(xk), seed),
    }
    for r in ratios:
        if r != primary:
            xr, yr = drawn.kept(r, counts)
            sets[f"real_synthetic@{r:g}"] = (np.concatenate([x_tr, xr]), np.concatenate([y_tr, yr]))
            sets[f"synthetic@{r:g}"] = (xr, yr)
    return sets


def _classifiers(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], ed: EvalData, seed: int, epochs: int, device: str
) -> tuple[dict[str, float | None], Any]:
    """The fixed CNN trained on each set, tested on the real test split (same val and test for all).

    Returns:
        The test AUROC per set (None for a set with one class only) and the real-only classifier.
    """
    from sklearn.metrics import roc_auc_score

    from medvae.eval.classifier import predict_proba, train_classifier

    sp = ed.split
    x_val, y_val = ed.x[sp.val_all], ed.y01[sp.val_all]
    aurocs: dict[str, float | None] = {}
    real_clf = None
    for name, (xa, ya) in sets.items():
        if len(np.unique(ya)) < 2:
            aurocs[name] = None
            continue
        clf = train_classifier(xa, ya, x_val, y_val, seed=seed, epochs=epochs, device=device)
        aurocs[name] = float(roc_auc_score(ed.y01[sp.test], predict_proba(clf, ed.x[sp.test])[:, 1]))
        real_clf = clf if name == "real" else real_clf
    return aurocs, real_clf


def _ratios(cfg: EvaluateConfig, frac: float) -> tuple[float, ...]:
    # The share sweep only where labels are scarce: at 100 % each extra classifier costs minutes on a CPU.
    extra = cfg.share_sweep if frac <= cfg.share_sweep_max_fraction else ()
    return tuple(sorted({cfg.synthetic_ratio, *extra}))


def _quality(clf: Any, drawn: Drawn, x_test: np.ndarray) -> dict[str, Any]:
    from medvae.eval.generation import generation_quality

    out: dict[str, Any] = {}
    for name, sel in (("drawn", np.ones(len(drawn.keep), bool)), ("kept", drawn.keep)):
        q = None if clf is None else generation_quality(clf, drawn.images[sel], drawn.labels[sel], x_test)
        out[name] = None if q is None else q.metrics()
    return out


def run_fraction(
    ed: EvalData, cfg: EvaluateConfig, seed: int, fi: int, device: str, progress: bool
) -> FractionRun:
    """Generator, synthetic images, privacy filter and the classifiers at label fraction ``fi``."""
    from medvae.engine.trainer import train_vae
    from medvae.synth.sample import fit_sampling

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
    ratios = _ratios(cfg, frac)
    requested = {c: round(max(ratios) * int((y_tr == c).sum())) for c in (0, 1)}
    thr = _privacy_threshold(x_tr, x[sp.val_all], cfg.privacy_quantile, seed)
    how = fit_sampling(
        gen,
        x_tr,
        y_tr,
        seed=seed,
        mixture=cfg.synthetic_sampler == "gmm",
        restore_detail=cfg.synthetic_restore_detail,
    )
    drawn = _draw_kept(gen, requested, x_tr, thr[0], seed * 1000 + fi * 100, cfg.synthetic_max_draws, how)
    privacy, d_test = _privacy(drawn, x_tr, x[sp.test], cfg.privacy_quantile, thr)
    t1 = time.perf_counter()
    sets = _train_sets(x_tr, y_tr, drawn, ratios, cfg.synthetic_ratio, seed)
    aurocs, real_clf = _classifiers(sets, ed, seed, cfg.classifier_epochs, device)
    return FractionRun(
        fraction=frac,
        n_real_train=len(tr),
        n_real_patients=len(set(ed.groups[tr].tolist())),
        auroc=aurocs,
        sizes={k: len(v[1]) for k, v in sets.items()},
        privacy=privacy,
        generation=_quality(real_clf, drawn, x[sp.test]),
        dcr_synthetic=drawn.distances,
        dcr_heldout=d_test,
        kept=drawn.keep,
        samples={c: drawn.images[drawn.labels == c][: cfg.pictures] for c in (0, 1)},
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

    Utility: test AUROC per training set, TSTR / real (per seed, then averaged), the paired differences
    real + synthetic − real and real + synthetic − real repeated (per seed), and the generation figures.
    """
    u_summary: dict[str, Any] = {}
    p_summary: dict[str, Any] = {}
    for f in runs[0].fractions:
        per = [u.fractions[f] for u in runs]
        names = [k for k in per[0].auroc if all(k in r.auroc for r in per)]
        a = {k: [r.auroc[k] for r in per] for k in names}
        u_summary[f] = {
            **{k: summarise(a[k]) for k in names},
            "tstr_ratio": summarise(_ratios_to_real(a["synthetic"], a["real"])),
            **{
                f"tstr_ratio@{k.split('@')[1]}": summarise(_ratios_to_real(a[k], a["real"]))
                for k in names
                if k.startswith("synthetic@")
            },
            "real_synthetic_minus_real": paired_differences(a["real_synthetic"], a["real"]),
            "real_synthetic_minus_real_repeated": paired_differences(a["real_synthetic"], a["real_repeated"]),
            "generation": _generation_summary(per),
        }
        p_summary[f] = {k: summarise([r.privacy[k] for r in per]) for k in PRIVACY_FIGURES}
    return u_summary, p_summary


def _ratios_to_real(syn: list[float | None], real: list[float | None]) -> list[float]:
    """Per seed: synthetic-only AUROC / real AUROC (TSTR / TRTR), where both were measured."""
    return [s / r for s, r in zip(syn, real, strict=True) if s is not None and r]


def _generation_summary(per: list[FractionRun]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which in ("drawn", "kept"):
        got = [r.generation[which] for r in per if r.generation.get(which)]
        out[which] = {k: summarise([g[k] for g in got]) for k in GENERATION_FIGURES} if got else None
    return out
