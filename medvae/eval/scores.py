"""The table of anomaly scores the evaluation compares: one entry per score.

Every score is a function of the fitted :class:`Reference` (the trained VAE, its calibration and what
was fitted on normal training images) and of the images being scored (:class:`Images`, which computes the
shared model outputs once and holds the scores computed so far). Scores are computed in table order, so a
combination may use any score registered above it. To compare a new score, add one entry to
:data:`REGISTRY`; the study, metrics.json, the plots and the report pick it up from there.

The first four are the pipeline's own scores (:data:`medvae.anomaly.stats.SCORES`, the ones a threshold
can be calibrated on); the others are research scores that exist only in the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medvae.anomaly.calibration import Calibration
from medvae.anomaly.stats import LatentStats, ledoit_wolf, mahalanobis, precision_from_cov, score_batch
from medvae.engine.inference import eval_mode, iter_batches, model_device
from medvae.eval.metrics import finite
from medvae.vae.model import ConvVAE


@torch.no_grad()
def posterior_params(
    model: ConvVAE, images: np.ndarray, *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances (float64, (N, d) each) of an unconditional VAE, in eval mode."""
    dev = model_device(model, None)
    mus: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    lvs: list[np.ndarray] = [np.zeros((0, model.latent_dim))]
    with eval_mode(model):
        for x, y in iter_batches(model, images, None, None, batch_size, dev):
            mu, lv = model.encode(x, y)
            mus.append(mu.double().cpu().numpy())
            lvs.append(lv.double().cpu().numpy())
    return np.concatenate(mus), np.concatenate(lvs)


def fit_stats(features: np.ndarray) -> LatentStats:
    """A Ledoit-Wolf Mahalanobis reference of feature rows (e.g. ``[μ, log σ²]`` of training normals)."""
    mean, cov, shrink = ledoit_wolf(features)
    return LatentStats(mean=mean, precision=precision_from_cov(cov), shrinkage=shrink, n_images=len(features))


@dataclass(eq=False)
class Reference:
    """What the scores are fitted on, once per trained model.

    Attributes:
        model: the trained anomaly VAE (unconditional).
        calibration: its threshold and latent reference, from the normal train/val images.
        mu_logvar_stats: the Ledoit-Wolf reference of ``[μ, log σ²]`` of the normal training images.
        val: every score of the held-out normal (val) images, in table order (z-scoring references).
    """

    model: ConvVAE
    calibration: Calibration
    mu_logvar_stats: LatentStats
    val: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(eq=False)
class Images:
    """Images being scored, with the model outputs the scores share, each computed at most once.

    Attributes:
        x: uint8 (N, H, W).
        scores: the scores computed so far, in table order.
    """

    x: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    _base: dict[str, np.ndarray] | None = None
    _params: tuple[np.ndarray, np.ndarray] | None = None

    def base(self, ref: Reference) -> dict[str, np.ndarray]:
        """The pipeline's scores (:func:`medvae.anomaly.stats.score_batch`, one eval-mode pass)."""
        if self._base is None:
            cal = ref.calibration
            self._base = score_batch(
                ref.model, self.x, stats=cal.stats, recon_kind=cal.recon_kind, roi=cal.roi
            )
        return self._base

    def posterior(self, ref: Reference) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means and log-variances (:func:`posterior_params`)."""
        if self._params is None:
            self._params = posterior_params(ref.model, self.x)
        return self._params


ScoreFn = Callable[[Reference, Images], np.ndarray]


@dataclass(frozen=True)
class Score:
    """One anomaly score: higher means more abnormal.

    Attributes:
        fn: computes the score of ``images`` given the fitted reference.
        description: one line for the report.
    """

    fn: ScoreFn
    description: str


def combined_zscore(
    scores: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Sequence[str]
) -> np.ndarray:
    """Sum of scores, each z-scored by the mean and sd of the same score on held-out normals.

    A combination that needs no labelled abnormal data: every part is put on the scale of normal variation.
    """
    total = np.zeros_like(np.asarray(scores[names[0]], dtype=np.float64))
    for n in names:
        ref = np.asarray(reference[n], dtype=np.float64)
        total += (np.asarray(scores[n], dtype=np.float64) - ref.mean()) / (ref.std() + 1e-12)
    return total


def _base(name: str) -> ScoreFn:
    return lambda ref, im: im.base(ref)[name]


def _mahalanobis_mu_logvar(ref: Reference, im: Images) -> np.ndarray:
    return mahalanobis(np.concatenate(im.posterior(ref), axis=1), ref.mu_logvar_stats)


def _lowpass_whole_image(ref: Reference, im: Images) -> np.ndarray:
    cal = ref.calibration
    return score_batch(ref.model, im.x, stats=cal.stats, recon_kind=cal.recon_kind)["lowpass_error"]


def _combined_z(ref: Reference, im: Images) -> np.ndarray:
    return combined_zscore(im.scores, ref.val, ("mahalanobis", "recon"))


REGISTRY: dict[str, Score] = {
    "lowpass_error": Score(
        _base("lowpass_error"), "squared error of the 2 px-blurred image and reconstruction, lung fields"
    ),
    "mahalanobis": Score(_base("mahalanobis"), "Mahalanobis distance of the posterior mean (Ledoit-Wolf)"),
    "kl": Score(_base("kl"), "KL(q(z|x) || N(0, I))"),
    "recon": Score(_base("recon"), "reconstruction NLL from the posterior mean"),
    "elbo": Score(_base("elbo"), "recon + kl (negative ELBO at the posterior mean)"),
    # The posterior variance says how confidently the encoder places an image; unusual images get unusual
    # variances as well as unusual means.
    "mahalanobis_mu_logvar": Score(_mahalanobis_mu_logvar, "Mahalanobis distance of [μ, log σ²]"),
    # The pipeline's low-pass error without its lung region: what the region of interest buys.
    "lowpass_error_whole": Score(_lowpass_whole_image, "the low-pass error over the whole image"),
    "combined_z": Score(_combined_z, "mahalanobis + recon, each z-scored on held-out normals"),
}


def score_images(ref: Reference, images: Images) -> dict[str, np.ndarray]:
    """Every score of :data:`REGISTRY`, in table order, made finite (see :func:`finite`)."""
    for name, score in REGISTRY.items():
        images.scores[name] = finite(score.fn(ref, images))
    return images.scores


def fit_reference(
    model: ConvVAE, train_normal: np.ndarray, val_normal: np.ndarray, calibration: Calibration
) -> Reference:
    """Fit the score references on the normal training images and score the held-out normals.

    Args:
        model: the trained VAE.
        train_normal: the normal images it was trained on.
        val_normal: held-out normal images (the calibration's and the z-scores' reference).
        calibration: from :func:`medvae.anomaly.calibration.calibrate` on the same images.

    Returns:
        The reference, with :attr:`Reference.val` filled in table order.
    """
    ref = Reference(
        model, calibration, fit_stats(np.concatenate(posterior_params(model, train_normal), axis=1))
    )
    # Share the dict: while the val images are scored, a combination reads the val scores above it.
    val = Images(val_normal, scores=ref.val)
    score_images(ref, val)
    return ref
