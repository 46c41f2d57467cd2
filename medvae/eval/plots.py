"""The evaluation's matplotlib figures, each written as one PNG.

Every axis shows every value it plots: bar charts start at 0 and state their values, curves span [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvae.eval.anomaly import AnomalyRun
from medvae.eval.metrics import fmt_msd, pr_points, roc_points
from medvae.eval.utility import SET_NAMES, TRAINING_SETS, FractionRun


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import io

    from medvae._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue(), mode=0o644)


def _curves(runs: list[AnomalyRun], summary: dict[str, Any], path: Path, kind: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points, metric = (roc_points, "auroc") if kind == "roc" else (pr_points, "auprc")
    for i, name in enumerate(runs[0].scores):
        c = colours[i % len(colours)]
        for j, run in enumerate(runs):
            xy = points(run.y, run.scores[name])
            label = f"{name}: {fmt_msd(summary[name][metric])}" if j == 0 else None
            # PR curves are steps: precision between two operating points is not a straight-line blend.
            style = "default" if kind == "roc" else "steps-post"
            ax.plot(xy[0], xy[1], color=c, lw=1.2, alpha=0.8, label=label, drawstyle=style)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance (0.5)")
        ax.set_xlabel("false-positive rate (normals flagged)")
        ax.set_ylabel("sensitivity (abnormals flagged)")
        legend_at = "lower right"
    else:
        prevalence = float(runs[0].y.mean())
        ax.axhline(prevalence, color="grey", lw=0.8, ls="--", label=f"chance (prevalence {prevalence:.2f})")
        ax.set_xlabel("sensitivity (recall)")
        ax.set_ylabel("precision (positive predictive value)")
        legend_at = "lower left"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    what = "AUROC" if kind == "roc" else "AUPRC"
    seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    split = "test split" if runs[0].split_name == "patient" else f"{runs[0].split_name}-aware test split"
    ax.set_title(f"{'ROC' if kind == 'roc' else 'Precision-recall'}, {split} ({seeds}, {what} mean ± sd)")
    ax.legend(loc=legend_at, fontsize=8)
    return _save(fig, path)


def plot_roc(runs: list[AnomalyRun], summary: dict[str, Any], path: Path) -> Path:
    """ROC curves of every score, one thin line per seed, the legend giving AUROC mean ± sd."""
    return _curves(runs, summary, path, "roc")


def plot_pr(runs: list[AnomalyRun], summary: dict[str, Any], path: Path) -> Path:
    """Precision-recall curves of every score, one line per seed, the legend giving AUPRC mean ± sd."""
    return _curves(runs, summary, path, "pr")


def plot_score_hist(run: AnomalyRun, path: Path) -> Path:
    """Histogram of the primary score for normal and abnormal test images, with the calibrated threshold."""
    plt = _pyplot()
    s, y = run.scores[run.primary], run.y
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.histogram_bin_edges(s, bins=40)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, density=True, label="normal")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, density=True, label="abnormal")
    ax.axvline(run.threshold, color="k", ls="--", lw=1, label="calibrated threshold")
    ax.set_xlabel(run.primary)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(cm: dict[str, int], title: str, path: Path) -> Path:
    """The 2×2 confusion matrix at the calibrated threshold: counts and the share of each true class."""
    plt = _pyplot()
    m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = (("true negative", "false positive"), ("false negative\n(missed)", "true positive"))
    for r in range(2):
        for c in range(2):
            colour = "white" if share[r, c] > 0.6 else "black"
            text = f"{int(m[r, c])}\n{share[r, c]:.1%}\n{names[r][c]}"
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks([0, 1], ["not flagged", "flagged"])
    ax.set_yticks([0, 1], ["normal", "abnormal"])
    ax.set_xlabel("screening decision")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_gallery(
    tiles: list[dict[str, Any]], images: np.ndarray, title: str, threshold: float, path: Path
) -> Path:
    """Test images with their score, percentile among held-out normals, true label and the decision.

    A tile's caption is red when the calibrated threshold gets it wrong (a flagged normal, a missed
    abnormal); the file name (without folders) heads it.
    """
    plt = _pyplot()
    cols = min(4, max(len(tiles), 1))
    rows = max(-(-len(tiles) // cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows + 0.5), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, img in zip(axes.flat, tiles, images, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        verdict = "FLAGGED" if tile["flagged"] else "not flagged"
        # The file name goes in the title too: tight_layout then keeps every caption clear of its neighbours.
        ax.set_title(
            f"{_short(Path(tile['name']).name)}\n{tile['label']} · {verdict}\n"
            f"score {tile['score']:.3g} · pct {tile['percentile']:.1f}",
            fontsize=8,
            color="firebrick" if tile["flagged"] != tile["abnormal"] else "black",  # red: a wrong call
        )
    legend = f"threshold {threshold:.3g}; pct: percentile among held-out normals; red: a wrong call"
    fig.suptitle(f"{title}\n{legend}", fontsize=10)
    return _save(fig, path)


def _short(name: str, n: int = 34) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def plot_dcr(fractions: list[FractionRun], title: str, path: Path) -> Path:
    """Distance-to-closest-record histograms: synthetic→train (before/after the filter), held-out→train."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    syn = np.concatenate([f.dcr_synthetic for f in fractions])
    kept = np.concatenate([f.dcr_synthetic[f.kept] for f in fractions])
    held = np.concatenate([f.dcr_heldout for f in fractions])
    bins = np.histogram_bin_edges(np.concatenate([syn, held]), bins=50)
    ax.hist(held, bins=bins, alpha=0.5, density=True, label="held-out real → train")
    ax.hist(syn, bins=bins, alpha=0.5, density=True, label="synthetic → train (all)")
    ax.hist(kept, bins=bins, histtype="step", lw=1.5, density=True, label="synthetic → train (kept)")
    for f in fractions:
        ax.axvline(f.privacy["reference_test_q"], color="k", ls=":", lw=1)
    ax.set_xlabel("RMS distance to the nearest training image (0..1 grey levels)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def utility_figure(summary: dict[str, Any]) -> Any:
    """The figure of :func:`plot_utility` (a matplotlib Figure, not yet saved)."""
    plt = _pyplot()
    fracs = list(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    kinds = [k for k in TRAINING_SETS if all(k in summary[f] for f in fracs)]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [summary[f][kind]["mean"] for f in fracs]
        sds = [summary[f][kind]["sd"] or 0.0 for f in fracs]
        pos = np.arange(len(fracs)) + (i - (len(kinds) - 1) / 2) * width
        bars = ax.bar(pos, [m or 0.0 for m in means], width, yerr=sds, capsize=3, label=SET_NAMES[kind])
        ax.bar_label(bars, labels=["n/a" if m is None else f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(len(fracs)), [f"{float(f):.0%} of labels" for f in fracs])
    ax.set_ylim(0.0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test AUROC (real test images)")
    ax.legend(fontsize=8, loc="upper center", ncol=4, bbox_to_anchor=(0.5, -0.1))
    return fig


def plot_utility(summary: dict[str, Any], path: Path) -> Path:
    """Test AUROC of the fixed classifier by training set and label fraction (mean ± sd over seeds).

    The axis runs from 0 to 1 so that no bar is hidden (an AUROC below chance is a finding, not an
    outlier to crop), each bar states its value, and a dashed line marks chance (0.5).
    """
    return _save(utility_figure(summary), path)
