"""Detail restoration: give decoded samples the fine structure of the training images.

A VAE decoder returns the mean of p(x | z), which averages away the fine structure that no latent code
predicts (rib edges, vessel and airway texture). Its samples are therefore smoother than any real scan: at
10 % of Kermany's labels the mean absolute neighbour difference was 12.0 grey levels against 20.4 for the
real images. A classifier trained on them alone then learns features that real scans do not show. An
independent CNN trained on synthetic images only reached test AUROC 0.62 as decoded, and 0.98 after an
unsharp mask that brought them to the real images' level (docs/quality.md).

The restoration is an unsharp mask, ``x + gain * (x - G_sigma * x)``. Its gain is fitted per label when
the model is trained, so that the decoded samples' sharpness matches that of the label's training images.
It uses no test data and no image of a patient, only one statistic of the training set, and it is saved
in the model directory (``detail.json``). The privacy filter judges the restored images, the ones that
are committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DETAIL_JSON = "detail.json"
DEFAULT_SIGMA = 1.0  # px at 64x64: the scale of the lost structure (a wider blur brightens whole regions)
MAX_GAIN = 8.0


def sharpness_per_image(images: np.ndarray) -> np.ndarray:
    """Each image's mean absolute difference between horizontal and vertical neighbours, in grey levels.

    Args:
        images: uint8 or float images (..., H, W) on the 0-255 scale (uint8 is measured in float32).

    Returns:
        One value per image, shape ``images.shape[:-2]``.
    """
    a = np.asarray(images)
    a = a.astype(np.float32) if a.dtype == np.uint8 else a
    dx = np.abs(np.diff(a, axis=-1)).mean(axis=(-2, -1))
    dy = np.abs(np.diff(a, axis=-2)).mean(axis=(-2, -1))
    return np.asarray((dx + dy) / 2)


def sharpness(images: np.ndarray) -> float:
    """Mean of :func:`sharpness_per_image` over a batch (N, H, W), in grey levels (0-255)."""
    if np.asarray(images).size == 0:
        raise ValueError("sharpness of no images")
    return float(sharpness_per_image(np.asarray(images, dtype=np.float32)).mean())


def unsharp(images: np.ndarray, gain: float, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """``x + gain * (x - G_sigma * x)``, rounded and clipped to uint8; gain 0 returns the images unchanged.

    Args:
        images: uint8 images (N, H, W).
        gain: how much of the high-pass part to add (>= 0).
        sigma: the Gaussian blur's standard deviation in pixels.
    """
    from scipy.ndimage import gaussian_filter

    if gain < 0:
        raise ValueError(f"gain must be >= 0, got {gain}")
    if gain == 0 or len(images) == 0:
        return np.asarray(images, dtype=np.uint8)
    a = np.asarray(images, dtype=np.float32)
    # Reflect at the borders (scipy's default), so the frame gets no artificial edge.
    high = a - gaussian_filter(a, sigma=(0, sigma, sigma))
    return np.clip(np.rint(a + gain * high), 0, 255).astype(np.uint8)


def fit_gain(decoded: np.ndarray, target: float, sigma: float = DEFAULT_SIGMA, iters: int = 24) -> float:
    """The unsharp gain at which ``decoded`` reaches sharpness ``target`` (bisection on [0, MAX_GAIN]).

    Sharpness grows with the gain (until clipping flattens it), so bisection finds the gain; a sample that
    is already as sharp as the target gets 0, and one that cannot reach it within MAX_GAIN gets MAX_GAIN.

    Args:
        decoded: uint8 decoded samples (N, H, W).
        target: the sharpness to reach (:func:`sharpness` of the real images).
        sigma: the unsharp mask's blur.
        iters: bisection steps (24 gives the gain to within 1e-6).
    """
    if sharpness(decoded) >= target:
        return 0.0
    lo, hi = 0.0, MAX_GAIN
    if sharpness(unsharp(decoded, hi, sigma)) <= target:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sharpness(unsharp(decoded, mid, sigma)) < target else (lo, mid)
    return round((lo + hi) / 2, 6)


@dataclass(frozen=True)
class DetailRestoration:
    """The fitted unsharp mask of a model's samples, one gain per label.

    Attributes:
        gains: label index → gain (:data:`~medvae.synth.latent.UNCONDITIONAL` for an unconditional model).
        sigma: the blur of the mask, in pixels.
        meta: what it was fitted on (sharpness of the training images and of the decoded samples, before
            and after), JSON types.
    """

    gains: dict[int, float]
    sigma: float = DEFAULT_SIGMA
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self, images: np.ndarray, label_index: int | None) -> np.ndarray:
        """Restore detail in one label's decoded samples (a label with no fitted gain is left as is)."""
        from medvae.synth.latent import UNCONDITIONAL

        key = UNCONDITIONAL if label_index is None else int(label_index)
        return unsharp(images, self.gains.get(key, 0.0), self.sigma)

    def to_json(self) -> dict[str, Any]:
        """The ``detail.json`` content."""
        return {
            "method": "unsharp mask, gain fitted so decoded samples match the training images' sharpness",
            "sigma": self.sigma,
            "gains": {str(k): v for k, v in sorted(self.gains.items())},
            **self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DetailRestoration:
        """Rebuild from :meth:`to_json`'s output."""
        meta = {k: v for k, v in obj.items() if k not in ("method", "sigma", "gains")}
        return cls({int(k): float(v) for k, v in obj["gains"].items()}, float(obj["sigma"]), meta)

    @classmethod
    def fit(
        cls, decoded: dict[int, np.ndarray], real: dict[int, np.ndarray], sigma: float = DEFAULT_SIGMA
    ) -> DetailRestoration:
        """One gain per label, from that label's decoded samples and its real training images."""
        gains: dict[int, float] = {}
        record: dict[str, dict[str, float]] = {}
        for key, dec in decoded.items():
            target = sharpness(real[key])
            gains[key] = fit_gain(dec, target, sigma)
            record[str(key)] = {
                "training_images": round(target, 4),
                "decoded": round(sharpness(dec), 4),
                "restored": round(sharpness(unsharp(dec, gains[key], sigma)), 4),
                "n_decoded": len(dec),
                "n_training_images": len(real[key]),
            }
        return cls(gains, sigma, {"sharpness": record})


def fit_for_model(
    model: Any,
    sampler: Any,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    seed: int,
    n: int = 256,
    sigma: float = DEFAULT_SIGMA,
) -> DetailRestoration:
    """Fit the restoration of a trained model's samples against its training images.

    Args:
        model: the trained ConvVAE.
        sampler: its latent sampler (:mod:`medvae.synth.latent`), or None for the prior.
        images: its uint8 training images (N, H, W).
        labels: their label indices for a conditional model, else None.
        seed: the sampling seed of the fitting draws.
        n: decoded samples per label.
        sigma: the unsharp mask's blur.
    """
    from medvae.synth.latent import UNCONDITIONAL
    from medvae.synth.sample import sample_images

    if model.n_cond and labels is not None:
        present = sorted(int(c) for c in np.unique(labels))
        real = {c: images[labels == c] for c in present}
        decoded = {c: sample_images(model, n, label_index=c, seed=seed + c, sampler=sampler) for c in present}
    else:
        real = {UNCONDITIONAL: images}
        decoded = {UNCONDITIONAL: sample_images(model, n, seed=seed, sampler=sampler)}
    return DetailRestoration.fit(decoded, real, sigma)


def load_detail(model_dir: Any) -> DetailRestoration | None:
    """The restoration saved in a model directory, or None for one trained before it existed."""
    from pathlib import Path

    from medvae.vae.artifacts import read_json

    if not (Path(model_dir) / DETAIL_JSON).is_file():
        return None
    return DetailRestoration.from_json(read_json(model_dir, DETAIL_JSON))
