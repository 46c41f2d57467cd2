"""Synthetic images decoded from latent draws."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medvae.engine.inference import Device, eval_mode, model_device, resolve_labels, to_uint8
from medvae.synth.detail import DetailRestoration
from medvae.synth.latent import GaussianMixtureSampler
from medvae.vae.model import ConvVAE


@dataclass(frozen=True)
class Sampling:
    """How a model's samples are made: the latent sampler (None: the prior N(0, I)) and the detail
    restoration (None: the decoder's output as is)."""

    sampler: GaussianMixtureSampler | None = None
    detail: DetailRestoration | None = None


def fit_sampling(
    model: ConvVAE,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    seed: int,
    mixture: bool = True,
    restore_detail: bool = True,
) -> Sampling:
    """Fit how a trained model samples, on its training images: the one recipe that ``medvae train``
    saves and ``medvae evaluate`` measures.

    Args:
        model: the trained ConvVAE.
        images: its uint8 training images (N, H, W).
        labels: their label indices for a conditional model, else None (ignored for an unconditional one).
        seed: the fitting seed.
        mixture: fit the latent Gaussian mixture on the posterior means; False: sample the prior.
        restore_detail: fit the unsharp mask that matches the samples' sharpness to the images'.
    """
    from medvae.synth import detail, latent

    labels = labels if model.n_cond else None
    sampler = latent.fit_for_model(model, images, labels, seed=seed) if mixture else None
    if not restore_detail:
        return Sampling(sampler, None)
    return Sampling(sampler, detail.fit_for_model(model, sampler, images, labels, seed=seed))


@torch.no_grad()
def sample_images(
    model: ConvVAE,
    n: int,
    *,
    label_index: int | None = None,
    seed: int,
    device: Device = None,
    batch_size: int = 512,
    sampler: GaussianMixtureSampler | None = None,
    detail: DetailRestoration | None = None,
) -> np.ndarray:
    """Decode ``n`` latent draws into uint8 images: from ``sampler`` when given, else the prior N(0, I).

    The latent codes are drawn on the CPU from a generator seeded with ``seed`` before anything moves
    to the device, so the same seed gives the same codes on any device and for any ``batch_size``
    (decoded pixels can still differ in the last bit between CPU and GPU kernels).

    Args:
        model: the VAE (put in eval mode for the call, so BatchNorm uses running statistics).
        n: how many images.
        label_index: the class to sample for a conditional model; must be None for an unconditional one.
        seed: the random seed.
        device: where to decode (the model is moved there); None: the model's device.
        batch_size: codes decoded per pass.
        sampler: a density fitted on training posterior means (:mod:`medvae.synth.latent`).
        detail: the model's fitted detail restoration (:mod:`medvae.synth.detail`), applied to the
            decoded images; None: the decoder's output as is.

    Returns:
        uint8 array (n, H, W).

    Raises:
        ValueError: for negative ``n``, a conditional model without ``label_index`` or an unconditional
            one with it (it would silently be ignored otherwise).
    """
    if n < 0 or batch_size < 1:
        raise ValueError("n must be >= 0 and batch_size >= 1")
    if label_index is not None and not model.n_cond:
        raise ValueError("label_index given, but this VAE is unconditional")
    if model.n_cond and label_index is None:
        raise ValueError("this VAE is conditional: pass label_index, the class to sample")
    dev = model_device(model, device)
    if sampler is not None:
        z_all = sampler.sample(n, label_index, seed)
    else:
        z_all = torch.randn(
            n, model.latent_dim, generator=torch.Generator(device="cpu").manual_seed(int(seed))
        )
    y_all = resolve_labels(model, None, n, label_index)
    size = model.cfg.image_size
    out: list[np.ndarray] = [np.zeros((0, size, size), dtype=np.uint8)]
    dtype = next(model.parameters()).dtype
    with eval_mode(model):
        for start in range(0, n, batch_size):
            z = z_all[start : start + batch_size].to(dev, dtype)
            y = None if y_all is None else y_all[start : start + batch_size].to(dev)
            out.append(to_uint8(model.decode(z, y)))
    images = np.concatenate(out, axis=0)
    return images if detail is None else detail.apply(images, label_index)


@dataclass(eq=False)
class PassingDraws:
    """Samples read in order until ``count`` passed a filter (see :func:`sample_passing`).

    Attributes:
        images: every sample read, uint8 (n, H, W); sample ``k`` keeps its index ``k`` across rounds.
        keep: which of them passed.
        distances: the filter's distance of each (for the privacy filter: to the nearest training image).
    """

    images: np.ndarray
    keep: np.ndarray
    distances: np.ndarray

    @property
    def read(self) -> int:
        """How many samples were read."""
        return len(self.keep)


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round ``r`` of a label's draws (round 0: ``seed`` itself)."""
    if r == 0:
        return seed
    digest = hashlib.sha256(f"medvae-sample-round\0{seed}\0{r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit a signed 64-bit integer


def sample_passing(
    draw: Callable[[int, int], np.ndarray],
    passes: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    count: int,
    max_draws: float,
    seed: int,
) -> PassingDraws:
    """Draw in rounds until ``count`` samples passed ``passes``, from at most ``max_draws * count``.

    One round of the requested size is not enough under the privacy filter: a blurry sample is close in
    RMS distance to many training images, and at 10 % of Kermany's labels the filter rejected 88 % of them
    (docs/quality.md). Each round asks for the shortfall divided by the pass rate so far. The samples are
    read in order and reading stops at the ``count``-th one that passed, so the same call gives the same
    samples, and the rest of the last round is never counted.

    Args:
        draw: ``draw(n, seed)`` gives ``n`` uint8 samples for a seed.
        passes: ``passes(images)`` gives a keep mask and a distance per image.
        count: samples wanted.
        max_draws: at most this many times ``count`` samples are read.
        seed: round 0's seed; round ``r`` uses :func:`round_seed` ``(seed, r)``.

    Returns:
        The samples read, which passed and their distances.
    """
    imgs, keeps, dists = [], [], []
    cap, kept, read, r = int(np.ceil(max_draws * count)), 0, 0, 0
    while kept < count and read < cap:
        need = count - kept
        rate = kept / read if read else 1.0
        n = min(cap - read, max(need, int(np.ceil(need / max(rate, 0.05)))))
        batch = draw(n, round_seed(seed, r))
        keep, dist = passes(batch)
        passed = np.flatnonzero(keep)
        # Stop reading at the count-th passing sample: the rest of the round was never needed.
        used = n if len(passed) < need else int(passed[need - 1]) + 1
        imgs.append(batch[:used])
        keeps.append(np.asarray(keep[:used], bool))
        dists.append(np.asarray(dist[:used], np.float64))
        kept, read, r = kept + int(keeps[-1].sum()), read + used, r + 1
    if not imgs:
        return PassingDraws(np.zeros((0, 0, 0), np.uint8), np.zeros(0, bool), np.zeros(0))
    return PassingDraws(np.concatenate(imgs), np.concatenate(keeps), np.concatenate(dists))


def sample_private(
    model: ConvVAE,
    count: int,
    *,
    label_index: int | None,
    seed: int,
    train: np.ndarray,
    threshold: float,
    max_draws: float,
    sampler: GaussianMixtureSampler | None = None,
    detail: DetailRestoration | None = None,
) -> PassingDraws:
    """:func:`sample_images` drawn until ``count`` samples passed the privacy filter against ``train``
    (:func:`sample_passing`; :func:`~medvae.synth.privacy.privacy_filter` at ``threshold``).

    The filter judges the images after detail restoration: those are the ones that are committed."""
    from medvae.synth.privacy import privacy_filter

    def draw(n: int, s: int) -> np.ndarray:
        return sample_images(model, n, label_index=label_index, seed=s, sampler=sampler, detail=detail)

    def passes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = privacy_filter(images, train, threshold)
        return f.keep, f.distances

    return sample_passing(draw, passes, count, max_draws, seed)
