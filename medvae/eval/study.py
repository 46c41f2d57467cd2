"""Held-out evaluation: anomaly screening, fidelity, synthetic-data utility and privacy, over seeds.

The orchestration only: :mod:`medvae.eval.data` loads and splits, :mod:`medvae.eval.anomaly` and
:mod:`medvae.eval.utility` run the two studies per seed, :mod:`medvae.eval.targets` checks the configured
targets, :mod:`medvae.eval.plots` draws and :mod:`medvae.eval.report` renders the HTML report.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae._io import atomic_write_text
from medvae.config import EvaluateConfig, to_jsonable
from medvae.eval import plots
from medvae.eval.anomaly import AnomalyRun, gallery, run_anomaly_seed, summarise_anomaly
from medvae.eval.anomaly import log_line as anomaly_log_line
from medvae.eval.data import EvalData, ShiftSplit, load_dataset, prepare, report_rejected, split_table
from medvae.eval.metrics import fmt_msd
from medvae.eval.report import Figure, write_report
from medvae.eval.scores import REGISTRY
from medvae.eval.targets import backwards_warnings, check_targets
from medvae.eval.utility import UtilityRun, run_fraction, summarise_utility
from medvae.eval.utility import log_line as utility_log_line

# The model pictures each study writes for its first seed, with their captions.
_GRIDS = {
    "reconstructions_normal": "Held-out normals (odd rows) and their reconstructions (first seed)",
    "reconstructions_abnormal": "Held-out abnormals and their reconstructions (first seed)",
    "samples_anomaly_vae": "Samples of the anomaly VAE (first seed)",
    "interpolation": "Latent interpolations between held-out normals (first seed)",
    "interpolation_normal_to_abnormal": "Latent interpolation normal → abnormal (first seed)",
    "samples_cvae_normal": "Conditional VAE samples, normal (first label fraction and seed, unfiltered)",
    "samples_cvae_abnormal": "Conditional VAE samples, abnormal (first label fraction and seed, unfiltered)",
}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def _refuse_model_dir(out_dir: Path) -> None:
    # The report and the galleries show real test images; a model directory is shipped to other sites.
    from medvae.vae.artifacts import WEIGHTS

    if (out_dir / WEIGHTS).exists():
        raise ValueError(
            f"{out_dir} holds a model ({WEIGHTS}); evaluation outputs show real test images and must not go "
            "into a model directory: pass another --out"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass(eq=False)
class Studies:
    """The runs of one evaluation.

    Attributes:
        anomaly: the anomaly study on the patient split, one run per seed.
        shift: the anomaly study on the shift-aware split (empty when there is none).
        utility: the utility study, one run per seed (empty when it did not run).
    """

    anomaly: list[AnomalyRun]
    shift: list[AnomalyRun]
    utility: list[UtilityRun]


def _anomaly_seeds(
    ed: EvalData,
    cfg: EvaluateConfig,
    device: str,
    pictures: Path | None,
    progress: bool,
    shift: ShiftSplit | None,
) -> list[AnomalyRun]:
    """The anomaly study of every seed on one split; pictures and localisation for the first seed."""
    runs: list[AnomalyRun] = []
    for i, seed in enumerate(cfg.seeds):
        first = i == 0
        local = cfg.localisation_images if first else 0
        grids = pictures if first else None
        runs.append(run_anomaly_seed(ed, cfg, seed, device, grids, progress, shift=shift, localise=local))
        _log(progress, anomaly_log_line(runs[-1]))
    return runs


def run_studies(
    ed: EvalData, cfg: EvaluateConfig, device: str, pictures: Path, progress: bool, timing: dict[str, float]
) -> Studies:
    """Both studies for every seed (the utility study only when ``cfg.utility``); pictures of the first.

    The anomaly study runs on the patient split and, when the data gives one, the shift-aware split.
    """
    t0 = time.perf_counter()
    anomaly = _anomaly_seeds(ed, cfg, device, pictures, progress, None)
    timing["anomaly_seconds"] = time.perf_counter() - t0
    shifted: list[AnomalyRun] = []
    if ed.shift is not None:
        t0 = time.perf_counter()
        shifted = _anomaly_seeds(ed, cfg, device, None, progress, ed.shift)
        timing["shift_seconds"] = time.perf_counter() - t0
    else:
        _log(progress, ed.shift_note)
    utility: list[UtilityRun] = []
    if cfg.utility:
        t0 = time.perf_counter()
        for seed in cfg.seeds:
            run = UtilityRun(seed, {})
            for fi, frac in enumerate(cfg.label_fractions):
                run.fractions[f"{frac:g}"] = fr = run_fraction(ed, cfg, seed, fi, device, progress)
                _log(progress, utility_log_line(seed, fr))
            utility.append(run)
        timing["utility_seconds"] = time.perf_counter() - t0
    return Studies(anomaly, shifted, utility)


def build_metrics(
    ed: EvalData,
    cfg: EvaluateConfig,
    anomaly: list[AnomalyRun],
    utility: list[UtilityRun],
    *,
    run: dict[str, str],
    info: dict[str, Any],
    shift: list[AnomalyRun] | None = None,
) -> dict[str, Any]:
    """The JSON metrics of a finished evaluation (targets and warnings included; timing added later).

    Args:
        ed: the prepared data.
        cfg: the settings.
        anomaly: the anomaly study's seeds.
        utility: the utility study's seeds (empty when it did not run).
        run: ``{"source", "normal_label", "device"}``.
        info: the source description of :func:`medvae.eval.data.load_dataset`.
        shift: the anomaly study's seeds on the shift-aware split (None or empty: there was none).
    """
    per_seed = [r.metrics() for r in anomaly]
    rejected = info.get("rejected", [])
    metrics: dict[str, Any] = {
        **run,
        "source_info": {k: v for k, v in info.items() if k != "rejected"},
        "intensity": ed.intensity,
        "config": to_jsonable(cfg),
        "data": {
            "n_images": len(ed.x),
            "label_names": sorted(set(ed.source.labels.tolist())),
            "rejected_files": len(rejected),
            # Reasons only (content-free, see medvae.data.readers); the file names went to the console.
            "rejected": [
                {"name": f"rejected file {i + 1}", "reason": r} for i, (_, r) in enumerate(rejected)
            ],
            "splits": split_table(ed),
            "patients_crossing_splits": 0,  # prepare() raised otherwise
        },
        "anomaly": {
            "per_seed": per_seed,
            "summary": summarise_anomaly(per_seed),
            "descriptions": {k: s.description for k, s in REGISTRY.items()},
            "gallery": {"seed": anomaly[0].seed, **gallery(anomaly[0], ed, cfg.gallery)},
            "localisation": per_seed[0].get("localisation"),
        },
    }
    if shift:
        metrics["shift"] = shift_metrics(ed, shift)
    else:
        metrics["shift_unavailable"] = ed.shift_note
    if utility:
        u_summary, p_summary = summarise_utility(utility)
        metrics["utility"] = {"per_seed": [u.metrics() for u in utility], "summary": u_summary}
        metrics["privacy"] = {"summary": p_summary}
    metrics = _jsonable(metrics)
    metrics["targets"] = check_targets(cfg.targets, metrics)
    metrics["warnings"] = backwards_warnings(metrics)
    return metrics


def shift_metrics(ed: EvalData, shift: list[AnomalyRun]) -> dict[str, Any]:
    """The shift-aware split's section of ``metrics.json``: its split, seeds, summary and cohort check."""
    from medvae.eval.cohort import summarise_cohort

    assert ed.shift is not None
    per_seed = [r.metrics() for r in shift]
    return {
        "note": ed.shift_note,
        "splits": split_table(ed, ed.shift.assignment),
        "per_seed": per_seed,
        "summary": summarise_anomaly(per_seed),
        "cohort": summarise_cohort([r["cohort"] for r in per_seed]),
        "localisation": per_seed[0].get("localisation"),
    }


def _heatmap_tiles(run: AnomalyRun, abnormal: int = 6, normal: int = 3) -> np.ndarray:
    """Rows of the localisation sample to show: abnormals and normals spread over their score range."""
    assert run.heat is not None
    rows = run.heat[0]
    s = run.scores[run.primary][rows]
    out = []
    for cls, k in ((1, abnormal), (0, normal)):
        members = np.flatnonzero(run.y[rows] == cls)
        ordered = members[np.argsort(-s[members], kind="stable")]
        if len(ordered):
            spread = np.linspace(0, len(ordered) - 1, min(k, len(ordered))).round().astype(np.int64)
            out.append(ordered[np.unique(spread)])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def heatmap_figure(run: AnomalyRun, ed: EvalData, path: Path) -> Path | None:
    """The localisation sample's heat maps, highest-scoring abnormals first, each with its caption."""
    from medvae.eval.localisation import heatmap_figure as draw

    if run.heat is None or not len(run.heat[0]):
        return None
    picks = _heatmap_tiles(run)
    rows = run.heat[0][picks]
    captions = []
    for r in rows.tolist():
        score = float(run.scores[run.primary][r])
        verdict = "FLAGGED" if score > run.threshold else "not flagged"
        label = str(ed.source.labels[run.test_index[r]])
        captions.append(f"{label} - {verdict}\nscore {score:.3g}, pct {run.percentile[r]:.1f}")
    return draw(ed.x[run.test_index[rows]], run.heat[1][picks], captions, path)


def make_figures(
    ed: EvalData,
    anomaly: list[AnomalyRun],
    utility: list[UtilityRun],
    metrics: dict[str, Any],
    out: Path,
    shift: list[AnomalyRun] | None = None,
) -> dict[str, Figure]:
    """Draw every figure into ``out`` and return them by report role (model grids already written)."""
    from medvae.synth.pictures import save_grid

    an = metrics["anomaly"]
    first, primary, seed = anomaly[0], an["summary"]["primary_score"], anomaly[0].seed
    figs = {
        "roc": Figure(
            plots.plot_roc(anomaly, an["summary"]["scores"], out / "roc.png"),
            "ROC curves of every anomaly score",
        ),
        "pr": Figure(
            plots.plot_pr(anomaly, an["summary"]["scores"], out / "pr.png"),
            "Precision-recall curves of every anomaly score",
        ),
        "score_hist": Figure(
            plots.plot_score_hist(first, out / "score_hist.png"), f"{primary} on the test split, seed {seed}"
        ),
    }
    title = f"{primary} at the calibrated threshold\ntest split, seed {seed}"
    figs["confusion"] = Figure(
        plots.plot_confusion(an["per_seed"][0]["confusion"], title, out / "confusion.png"), title
    )
    for role, key, what in (
        ("gallery_fp", "false_positives", "Highest-scoring normal test images (worst false positives)"),
        ("gallery_missed", "missed", "Lowest-scoring abnormal test images (missed or nearly missed)"),
    ):
        tiles = an["gallery"][key]
        if tiles:
            imgs = ed.source.images[[t["position"] for t in tiles]]
            caption = f"{what}, seed {seed}, images as loaded (before intensity standardisation)"
            figs[role] = Figure(
                plots.plot_gallery(tiles, imgs, what, first.threshold, out / f"{role}.png"), caption
            )
    if utility:
        for f in utility[0].fractions:
            runs = [u.fractions[f] for u in utility]
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            title = f"{float(f):.0%} of labels: DCR over {seeds} (dotted: test 1st percentile)"
            figs[f"dcr_{f}"] = Figure(plots.plot_dcr(runs, title, out / f"dcr_{f}.png"), title)
        figs["utility"] = Figure(
            plots.plot_utility(metrics["utility"]["summary"], out / "utility.png"), "Fixed-CNN test AUROC"
        )
        samples = next(iter(utility[0].fractions.values())).samples
        for c, name in ((0, "normal"), (1, "abnormal")):
            if len(samples[c]):
                save_grid(samples[c], out / f"samples_cvae_{name}.png")
    heat_runs: list[tuple[str, AnomalyRun, str]] = [("heatmaps", anomaly[0], "patient split")]
    if shift:
        heat_runs.append(("heatmaps_shift", shift[0], "shift-aware split"))
    for role, hr, what in heat_runs:
        path = heatmap_figure(hr, ed, out / f"{role}.png")
        if path is not None:
            figs[role] = Figure(
                path,
                f"Occlusion heat maps of {primary}, {what}, seed {hr.seed}: scan, heat over it, colour "
                "bar (one scale for all tiles); abnormals from the highest score down, then normals",
            )
    if shift:
        sm = metrics["shift"]
        figs["roc_shift"] = Figure(
            plots.plot_roc(shift, sm["summary"]["scores"], out / "roc_shift.png"),
            "ROC curves on the shift-aware split",
        )
    for role, caption in _GRIDS.items():
        figs.setdefault(role, Figure(out / f"{role}.png", caption))
    return figs


def evaluate(
    source: str | Path,
    out_dir: Path,
    *,
    normal_label: str,
    cfg: EvaluateConfig,
    store_version: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the VAE on a labelled real dataset and write ``metrics.json``, ``report.html`` and PNGs.

    On one deterministic patient-grouped split (``cfg.split_seed``), for every model seed in ``cfg.seeds``:
    anomaly screening and fidelity (:mod:`medvae.eval.anomaly`) and, with ``cfg.utility``, synthetic-data
    utility and privacy (:mod:`medvae.eval.utility`). ``cfg.targets`` are checked, and every AUROC below
    0.5 is a warning (in ``metrics["warnings"]``, the report's banner and the log).

    Args:
        source: a store URI (used when ``Store(source).exists()``) or an ImageFolder directory.
        out_dir: where metrics.json, report.html, pictures/ and the decoded-image cache go (not a model
            directory: the report shows real test images).
        normal_label: the label of normal images; every other label counts as abnormal (positive).
        cfg: the evaluation settings.
        store_version: the store version to read (stores only); latest when None.
        progress: log one line per stage (and training progress bars) to stderr.

    Returns:
        The metrics dict, as written to ``metrics.json``.

    Raises:
        ValueError: for a model directory as ``out_dir``, a missing normal label, no abnormal image, or a
            split too small.
        FileNotFoundError: when the source is neither a store nor a folder.
    """
    from medvae.engine.device import select_device

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    _refuse_model_dir(out_dir)
    pictures = out_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    data, info = load_dataset(
        source,
        store_version=store_version,
        ingest_cfg=cfg.ingest,
        workers=cfg.workers,
        cache_dir=out_dir / "cache",
        shift=cfg.shift if cfg.shift.enabled else None,
    )
    report_rejected(info.get("rejected", []))
    timing = {"load_seconds": time.perf_counter() - t_start}
    ed = prepare(data, normal_label, cfg, info.get("stored_intensity", "none"))
    _log(
        progress,
        f"loaded {len(data.images)} images ({info['kind']}), labels {sorted(set(data.labels.tolist()))}",
    )
    device = select_device(cfg.device).type
    st = run_studies(ed, cfg, device, pictures, progress, timing)
    run = {"source": str(source), "normal_label": normal_label, "device": device}
    metrics = build_metrics(ed, cfg, st.anomaly, st.utility, run=run, info=info, shift=st.shift)
    figures = make_figures(ed, st.anomaly, st.utility, metrics, pictures, shift=st.shift)
    timing["total_seconds"] = time.perf_counter() - t_start
    metrics["timing"] = timing
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(metrics, figures, out_dir / "report.html")
    for w in metrics["warnings"]:
        _log(progress, f"WARNING: {w}")
    _log(
        progress,
        f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'} in {timing['total_seconds']:.0f} s",
    )
    return metrics


def _pct_msd(v: dict[str, Any]) -> str:
    if v.get("mean") is None:
        return "n/a"
    return f"{100 * v['mean']:.1f}%" + (f" ± {100 * v['sd']:.1f}" if v.get("n", 0) > 1 else "")


def _shift_lines(metrics: dict[str, Any]) -> list[str]:
    """The shift-aware split beside the patient split, and the heat maps' localisation."""
    an = metrics["anomaly"]["summary"]
    primary = an["primary_score"]
    lines = []
    if "shift" not in metrics:
        lines.append(f"shift-aware split: none ({metrics.get('shift_unavailable', 'not run')})")
    else:
        sh, co = metrics["shift"]["summary"], metrics["shift"]["cohort"]
        lines.append(
            f"{primary} AUROC, patient split {fmt_msd(an['scores'][primary]['auroc'])} | shift-aware split "
            f"{fmt_msd(sh['scores'][primary]['auroc'])} ({metrics['shift']['note']})"
        )
        if not co["held_out"]:
            lines.append("threshold on a new cohort: not checked (the shift-aware split holds out no batch)")
        else:
            lines.append(
                f"threshold on the new cohort's normals (target {sh['target_fpr']:.0%}): stored "
                f"{_pct_msd(co['new_cohort_fpr'])}; recalibrated on {co['local_normals']} of its normals "
                f"{_pct_msd(co['recalibrated_fpr'])} (mean of {co['draws']} draws a seed; sensitivity "
                f"{fmt_msd(co['recalibrated_sensitivity'])})"
            )
    lines += _sharpness_lines(metrics)
    for name, loc in (
        ("patient", metrics["anomaly"].get("localisation")),
        ("shift-aware", metrics.get("shift", {}).get("localisation")),
    ):
        if loc and loc.get("chance"):
            lines.append(_localisation_line(name, loc))
    return lines


def _localisation_line(name: str, loc: dict[str, Any]) -> str:
    """Where the heat of the deciding score lies; for a lungs-only score, where its unmasked error lies."""
    images = f"{loc['n_abnormal']}+{loc['n_normal']} images"
    if loc.get("lungs_only") and loc.get("unmasked_abnormal") is not None:
        return (
            f"heat maps, {name} split: the score counts only the lungs, so its heat lies there by "
            f"construction; the same error over the whole image puts {loc['unmasked_abnormal']:.3f} of "
            f"its heat in the lungs for abnormals, {loc['unmasked_normal']:.3f} for normals "
            f"(chance {loc['chance']:.3f}; {images})"
        )
    return (
        f"heat maps, {name} split: {loc['share_abnormal']:.3f} of the heat in the lungs for "
        f"abnormals ({loc['abnormal_x_chance']:.2f}x chance {loc['chance']:.3f}), "
        f"{loc['share_normal']:.3f} for normals ({images})"
    )


def _sharpness_lines(metrics: dict[str, Any]) -> list[str]:
    """The primary score among test images of equal sharpness, beside the sharpness alone as a detector."""
    an = metrics["anomaly"]["summary"]
    if "sharpness_matched_auroc" not in an:  # a metrics.json written before the check existed
        return []
    parts = [("patient split", an)]
    if "shift" in metrics:
        parts.append(("shift-aware split", metrics["shift"]["summary"]))
    return [
        f"{an['primary_score']} AUROC among test images of equal sharpness: "
        + " | ".join(
            f"{name} {fmt_msd(sm['sharpness_matched_auroc'])} (sharpness alone "
            f"{fmt_msd(sm['sharpness_alone_auroc'])})"
            for name, sm in parts
        )
    ]


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline figures of a :func:`evaluate` result as plain text lines (for the CLI and scripts).

    Args:
        metrics: the dict returned by :func:`evaluate` (or read back from ``metrics.json``).

    Returns:
        Lines without trailing newlines: warnings first (``WARNING: ...``), then the split, anomaly
        AUROC/AUPRC of every score, the operating point at the calibrated threshold, fidelity, and, when
        run, utility, privacy, and the targets.
    """
    an = metrics["anomaly"]["summary"]
    sp = metrics["data"]["splits"]
    lines = [f"WARNING: {w}" for w in metrics.get("warnings", [])]
    lines += [
        f"seeds {metrics['config']['seeds']} on {metrics['device']}; split (images/patients): "
        + ", ".join(f"{k} {v['images']}/{v['patients']}" for k, v in sp.items()),
        "anomaly AUROC | AUPRC (mean ± sd), normal vs abnormal on the test split:",
    ]
    lines += [f"  {k:24s} {fmt_msd(v['auroc'])} | {fmt_msd(v['auprc'])}" for k, v in an["scores"].items()]
    lines.append(
        f"primary {an['primary_score']} at the calibrated threshold: sensitivity "
        f"{fmt_msd(an['sensitivity'])}, specificity {fmt_msd(an['specificity'])}, test FPR "
        f"{fmt_msd(an['test_fpr'])} (target {an['target_fpr']})"
    )
    lines.append(
        f"fidelity on held-out normals: SSIM {fmt_msd(an['ssim'])}, PSNR {fmt_msd(an['psnr'], 2)} dB"
    )
    lines += _shift_lines(metrics)
    if "utility" in metrics:
        lines.append(
            "utility, fixed CNN test AUROC (real | real+synthetic | synthetic only | TSTR/real | "
            "real repeated to the real+synthetic size):"
        )
        for f, v in metrics["utility"]["summary"].items():
            lines.append(
                f"  {float(f):4.0%} labels: {fmt_msd(v['real'])} | {fmt_msd(v['real_synthetic'])} | "
                f"{fmt_msd(v['synthetic'])} | {fmt_msd(v['tstr_ratio'])} | {fmt_msd(v['real_repeated'])}"
            )
            lines += _generation_lines(f, v)
        lines.append("privacy, share of synthetic near copies before -> after the filter (rejected):")
        for f, v in metrics["privacy"]["summary"].items():
            lines.append(
                f"  {float(f):4.0%} labels: {fmt_msd(v['near_copy_share_before'])} -> "
                f"{fmt_msd(v['near_copy_share_after'])} ({fmt_msd(v['rejection_rate'])})"
            )
    for t in metrics["targets"]:
        verdict = "met" if t["met"] else "NOT met" if t["met"] is False else "n/a"
        lines.append(f"target {verdict}: {t['target']}")
    return lines


def _generation_lines(fraction: str, v: dict[str, Any]) -> list[str]:
    """Paired differences, the share sweep and the generation figures of one label fraction."""
    lines = [
        f"    paired: real+synthetic − real {fmt_msd(v['real_synthetic_minus_real'])}, − real repeated "
        f"{fmt_msd(v['real_synthetic_minus_real_repeated'])}"
    ]
    sweep = [k.split("@")[1] for k in v if k.startswith("real_synthetic@")]
    if sweep:
        shares = ", ".join(
            f"{r}x {fmt_msd(v[f'real_synthetic@{r}'])} | {fmt_msd(v.get(f'synthetic@{r}'))} | "
            f"{fmt_msd(v.get(f'tstr_ratio@{r}'))}"
            for r in sweep
        )
        lines.append(f"    other synthetic shares (real+synthetic | synthetic only | TSTR/real): {shares}")
    for which, g in (v.get("generation") or {}).items():
        if g:
            lines.append(
                f"    {which} synthetic images: label fidelity {fmt_msd(g['label_fidelity'])}, FD "
                f"{fmt_msd(g['fd'], 2)}, precision {fmt_msd(g['precision'])}, recall {fmt_msd(g['recall'])}"
            )
    return lines
