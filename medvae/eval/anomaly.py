"""The anomaly-screening study, one seed at a time: train on normals, calibrate, score, measure fidelity.

:func:`run_anomaly_seed` returns an :class:`AnomalyRun` whose score arrays stay in memory for the
figures and the gallery; :meth:`AnomalyRun.metrics` is the JSON part, and :func:`summarise_anomaly`
combines the seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvae.config import EvaluateConfig, TrainConfig
from medvae.eval.cohort import CohortCheck
from medvae.eval.confounds import SharpnessCheck, check_sharpness
from medvae.eval.data import EvalData, ShiftSplit
from medvae.eval.localisation import LocalisationCheck
from medvae.eval.metrics import binary_metrics, bootstrap_auroc, confusion, proportion, summarise
from medvae.eval.scores import REGISTRY, Images, fit_reference, score_images
from medvae.vae.model import ConvVAE


def with_seed_device(cfg: TrainConfig, seed: int, device: str, **model: Any) -> TrainConfig:
    """``cfg`` with the model seed, the device and optional model-config fields replaced."""
    m = cfg.model.model_copy(update=model) if model else cfg.model
    return cfg.model_copy(update={"seed": seed, "device": device, "model": m})


@dataclass(eq=False)
class AnomalyRun:
    """One seed of the anomaly study.

    Attributes:
        seed: the model seed.
        primary: the calibrated score.
        threshold: its threshold (flag when ``score > threshold``).
        target_fpr: the calibration's false-positive rate on val normals.
        test_index: positions of the test images in :attr:`EvalData.x`.
        y: 0/1 of each test image.
        scores: every :data:`medvae.eval.scores.REGISTRY` score of the test images.
        val_scores: the same scores of the held-out normal (val) images.
        percentile: the primary score of each test image as a percentile among the val normals (0..100).
        auroc_ci: the 95% bootstrap interval of each score's AUROC (None without bootstrap).
        fidelity: ``{"ssim", "psnr", "n"}`` of reconstructed normal test images.
        training: training facts (best epoch, epochs run, early stop, device, seconds).
        n_train_normal: training normals.
        split_name: ``"patient"`` or ``"shift"`` (the shift-aware split).
        cohort: on the shift-aware split, the threshold on the unseen cohort's normals.
        localisation: the heat maps' lung share (the first seed of each split only).
        heat: the localisation sample's test rows (into :attr:`test_index`) and their maps, for the figure.
        sharpness: the primary score's AUROC once the test images' sharpness is matched, and the sharpness
            alone as a detector (:mod:`medvae.eval.confounds`).
    """

    seed: int
    primary: str
    threshold: float
    target_fpr: float
    test_index: np.ndarray
    y: np.ndarray
    scores: dict[str, np.ndarray]
    val_scores: dict[str, np.ndarray]
    percentile: np.ndarray
    auroc_ci: dict[str, tuple[float, float] | None]
    fidelity: dict[str, float]
    training: dict[str, Any]
    n_train_normal: int
    split_name: str = "patient"
    cohort: CohortCheck | None = None
    localisation: LocalisationCheck | None = None
    heat: tuple[np.ndarray, np.ndarray] | None = None
    sharpness: SharpnessCheck | None = None

    @property
    def flagged(self) -> np.ndarray:
        """Whether each test image scores above the calibrated threshold."""
        return self.scores[self.primary] > self.threshold

    def metrics(self) -> dict[str, Any]:
        """The JSON figures of this seed (no arrays)."""
        y, flags = self.y, self.flagged
        scores = {k: {**binary_metrics(y, v), "auroc_ci95": self.auroc_ci[k]} for k, v in self.scores.items()}
        cm = confusion(y, flags)
        return {
            "seed": self.seed,
            "scores": scores,
            "primary_score": self.primary,
            "threshold": self.threshold,
            "sensitivity": float(flags[y == 1].mean()) if (y == 1).any() else None,
            "specificity": float(1.0 - flags[y == 0].mean()) if (y == 0).any() else None,
            "val_fpr": float((self.val_scores[self.primary] > self.threshold).mean()),
            "test_fpr": {**proportion(cm["fp"], cm["fp"] + cm["tn"]), "target": self.target_fpr},
            "confusion": cm,
            "n_train_normal": self.n_train_normal,
            "n_val_normal": len(self.val_scores[self.primary]),
            "n_test_normal": int((y == 0).sum()),
            "n_test_abnormal": int((y == 1).sum()),
            **self.training,
            "fidelity": self.fidelity,
            "split": self.split_name,
            **({"cohort": self.cohort.metrics()} if self.cohort else {}),
            **({"localisation": self.localisation.metrics()} if self.localisation else {}),
            **({"sharpness": self.sharpness.metrics()} if self.sharpness else {}),
        }


@torch.no_grad()
def reconstruct(model: ConvVAE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode reconstructions from the posterior mean, uint8 (N, H, W)."""
    from medvae.engine.inference import eval_mode, iter_batches, model_device, to_uint8

    dev = model_device(model, None)
    recs: list[np.ndarray] = [np.zeros((0, *images.shape[1:]), np.uint8)]
    with eval_mode(model):
        for x, y in iter_batches(model, images, None, None, batch_size, dev):
            recs.append(to_uint8(model(x, y).recon))
    return np.concatenate(recs)


def fidelity(model: ConvVAE, normals: np.ndarray) -> dict[str, float]:
    """Mean SSIM and PSNR (dB) of posterior-mean reconstructions of held-out normal images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rec = reconstruct(model, normals)
    ssim = [structural_similarity(a, b, data_range=255) for a, b in zip(normals, rec, strict=True)]
    psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(normals, rec, strict=True)]
    return {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr)), "n": len(normals)}


def model_pictures(
    model: ConvVAE, normals: np.ndarray, abnormals: np.ndarray, out: Path, k: int, seed: int
) -> None:
    """Reconstruction, sample and interpolation grids of one trained anomaly VAE (PNG files in ``out``)."""
    from medvae.synth.pictures import interpolation_grid, reconstruction_grid, save_grid
    from medvae.synth.sample import sample_images

    reconstruction_grid(model, normals[:k], out / "reconstructions_normal.png", n=k)
    if len(abnormals):
        reconstruction_grid(model, abnormals[:k], out / "reconstructions_abnormal.png", n=k)
    save_grid(sample_images(model, k * 2, seed=seed), out / "samples_anomaly_vae.png")
    pairs = min(4, len(normals) // 2)
    if pairs >= 1:
        interpolation_grid(model, normals[:pairs], normals[pairs : 2 * pairs], out / "interpolation.png")
    if len(abnormals):
        interpolation_grid(model, normals[:1], abnormals[:1], out / "interpolation_normal_to_abnormal.png")


def run_anomaly_seed(
    ed: EvalData,
    cfg: EvaluateConfig,
    seed: int,
    device: str,
    pictures_dir: Path | None,
    progress: bool,
    *,
    shift: ShiftSplit | None = None,
    localise: int = 0,
) -> AnomalyRun:
    """Train the anomaly VAE on normal training images, calibrate on val normals, score the test split.

    Args:
        ed: the prepared data and split.
        cfg: the evaluation settings.
        seed: the model seed.
        device: ``"cpu"`` or ``"cuda"``.
        pictures_dir: where to write the model's picture grids (None: none).
        progress: training progress bars.
        shift: run on this shift-aware split instead of the patient split, and check the threshold on its
            unseen cohort (:func:`medvae.eval.cohort.check_cohort`).
        localise: abnormal and normal test images (each) for the localisation check; 0: none.
    """
    from medvae.anomaly.calibration import calibrate, percentile_among_normals
    from medvae.engine.trainer import train_vae
    from medvae.eval.cohort import check_cohort
    from medvae.eval.localisation import check_localisation

    x, sp = ed.x, (shift.split if shift is not None else ed.split)
    tcfg = with_seed_device(cfg.anomaly, seed, device, conditional=False, num_classes=0)
    t0 = time.perf_counter()
    res = train_vae(x[sp.train_normal], None, tcfg, val_images=x[sp.val_normal], progress=progress)
    train_s = time.perf_counter() - t0
    model = res.model.eval()
    cal = calibrate(
        model,
        x[sp.train_normal],
        x[sp.val_normal],
        score=cfg.primary_score,
        fpr=cfg.false_positive_rate,
        recon_kind=tcfg.loss.reconstruction,
    )
    ref = fit_reference(model, x[sp.train_normal], x[sp.val_normal], cal)
    scores = score_images(ref, Images(x[sp.test]))
    y = sp.test_y
    normals = x[sp.test[y == 0]]
    if pictures_dir is not None:
        model_pictures(model, normals, x[sp.test[y == 1]], pictures_dir, cfg.pictures, seed)
    cohort = None
    if shift is not None:
        draws = cfg.shift.recalibration_draws
        cohort = check_cohort(model, cal, ed, shift, scores[cfg.primary_score], seed=seed, draws=draws)
    local, heat = None, None
    if localise:
        local, picks, maps = check_localisation(
            model, cal, x[sp.test], y, scores[cfg.primary_score], localise, seed
        )
        heat = (picks, maps)
    return AnomalyRun(
        seed=seed,
        primary=cfg.primary_score,
        threshold=float(cal.threshold),
        target_fpr=float(cal.fpr),
        test_index=sp.test,
        y=y,
        scores=scores,
        val_scores=ref.val,
        percentile=percentile_among_normals(scores[cfg.primary_score], cal),
        auroc_ci={k: bootstrap_auroc(y, v, cfg.bootstrap, seed=seed) for k, v in scores.items()},
        fidelity=fidelity(model, normals),
        training=_training_facts(res, train_s),
        n_train_normal=len(sp.train_normal),
        split_name="patient" if shift is None else "shift",
        cohort=cohort,
        localisation=local,
        heat=heat,
        sharpness=check_sharpness(y, scores[cfg.primary_score], x[sp.test]),
    )


def _training_facts(res: Any, seconds: float) -> dict[str, Any]:
    return {
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "stopped_early": res.stopped_early,
        "device": res.device,
        "train_seconds": seconds,
    }


def log_line(run: AnomalyRun) -> str:
    """The one-line progress report of a seed."""
    m = {k: binary_metrics(run.y, v)["auroc"] for k, v in run.scores.items()}
    split = "" if run.split_name == "patient" else f" ({run.split_name}-aware split)"
    return (
        f"seed {run.seed} anomaly{split}: {run.primary} AUROC {m[run.primary]:.3f}, "
        f"recon AUROC {m['recon']:.3f}, "
        f"SSIM {run.fidelity['ssim']:.3f} ({run.training['train_seconds']:.0f} s training on "
        f"{run.training['device']})"
    )


def summarise_anomaly(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of every figure of :meth:`AnomalyRun.metrics`."""
    return {
        "primary_score": per_seed[0]["primary_score"],
        "scores": {
            k: {
                "auroc": summarise([r["scores"][k]["auroc"] for r in per_seed]),
                "auprc": summarise([r["scores"][k]["auprc"] for r in per_seed]),
            }
            for k in REGISTRY
        },
        "sensitivity": summarise([r["sensitivity"] for r in per_seed]),
        "specificity": summarise([r["specificity"] for r in per_seed]),
        "val_fpr": summarise([r["val_fpr"] for r in per_seed]),
        "test_fpr": summarise([r["test_fpr"]["value"] for r in per_seed]),
        "target_fpr": per_seed[0]["test_fpr"]["target"],
        "sharpness_matched_auroc": summarise([r.get("sharpness", {}).get("matched_auroc") for r in per_seed]),
        "sharpness_alone_auroc": summarise([r.get("sharpness", {}).get("alone_auroc") for r in per_seed]),
        "sharpness_strata": per_seed[0].get("sharpness", {}).get("strata"),
        "ssim": summarise([r["fidelity"]["ssim"] for r in per_seed]),
        "psnr": summarise([r["fidelity"]["psnr"] for r in per_seed]),
    }


def gallery(run: AnomalyRun, ed: EvalData, k: int) -> dict[str, list[dict[str, Any]]]:
    """The report's two galleries, as positions and facts (no pixels).

    ``false_positives``: the ``k`` highest-scoring test normals (the worst false alarms, flagged or nearly
    so); ``missed``: the ``k`` lowest-scoring test abnormals (the misses, below the threshold, or the
    nearest to being missed). Each tile has the image's name and true label, its primary score, its
    percentile among held-out normals and whether the calibrated threshold flags it.
    """
    s = run.scores[run.primary]
    normal = np.flatnonzero(run.y == 0)
    abnormal = np.flatnonzero(run.y == 1)
    picks = {
        "false_positives": normal[np.argsort(-s[normal], kind="stable")[:k]],
        "missed": abnormal[np.argsort(s[abnormal], kind="stable")[:k]],
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rows in picks.items():
        out[key] = [
            {
                "position": int(run.test_index[i]),
                "name": str(ed.source.names[run.test_index[i]]),
                "label": str(ed.source.labels[run.test_index[i]]),
                "abnormal": bool(run.y[i]),
                "score": float(s[i]),
                "percentile": float(run.percentile[i]),
                "flagged": bool(s[i] > run.threshold),
            }
            for i in rows
        ]
    return out
