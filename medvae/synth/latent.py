"""Where synthetic images start: latent codes from a density fitted on the training posterior means.

A VAE's aggregate posterior does not fill its N(0, I) prior (the "prior hole"), so decoded prior draws
are the grey mush between real images. Ex-post density estimation (Ghosh et al. 2020, Pythae's GMM
sampler) fits one Gaussian mixture per label on the posterior means of the training images and samples
from it instead. Measured on Kermany (docs/quality.md): Fréchet distance 4.9 vs 5.8 from the prior,
label fidelity AUROC 0.985 vs 0.974, and samples a reader recognises as chest X-rays.

The mixture is saved in the model directory as plain tensors (``sampler.safetensors``) and JSON
(``sampler.json``), like every other artifact there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

SAMPLER_TENSORS = "sampler.safetensors"
SAMPLER_JSON = "sampler.json"
UNCONDITIONAL = -1  # the mixture key of a model without labels


@dataclass(frozen=True)
class GaussianMixtureSampler:
    """One Gaussian mixture per label over training posterior means.

    Attributes:
        components: ``{label_index: (weights (K,), means (K, D), scale_tril (K, D, D))}``, float64;
            :data:`UNCONDITIONAL` holds the mixture of an unconditional model.
        meta: how it was fitted (JSON types).
        temperature: component covariances are scaled by this when sampling; < 1 trades diversity for
            typicality, 1 is the fitted mixture.
    """

    components: dict[int, tuple[Tensor, Tensor, Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0

    @classmethod
    def fit(
        cls,
        mu: np.ndarray,
        labels: np.ndarray | None,
        *,
        n_components: int = 10,
        covariance: Literal["full", "diag"] = "full",
        reg_covar: float = 1e-4,
        min_per_component: int = 50,
        seed: int = 0,
    ) -> GaussianMixtureSampler:
        """Fit a mixture per label on posterior means ``mu`` (N, D).

        Each label gets ``min(n_components, max(1, n_label // min_per_component))`` components, so a
        small label set (1 % of the labels) gets one well-conditioned Gaussian, not an overfitted mixture.
        """
        from sklearn.mixture import GaussianMixture

        m = np.asarray(mu, dtype=np.float64)
        groups = {UNCONDITIONAL: m} if labels is None else {int(c): m[labels == c] for c in np.unique(labels)}
        comps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for c, mc in groups.items():
            k = int(min(n_components, max(1, len(mc) // max(1, min_per_component))))
            gm = GaussianMixture(k, covariance_type=covariance, reg_covar=reg_covar, random_state=seed).fit(
                mc
            )
            cov = gm.covariances_ if covariance == "full" else np.stack([np.diag(v) for v in gm.covariances_])
            comps[c] = (
                torch.tensor(gm.weights_),
                torch.tensor(gm.means_),
                torch.tensor(np.linalg.cholesky(cov)),
            )
        meta = {
            "kind": "gmm",
            "n_components": n_components,
            "covariance": covariance,
            "reg_covar": reg_covar,
            "n_fitted": {str(c): len(mc) for c, mc in groups.items()},
        }
        return cls(comps, meta)

    def with_temperature(self, temperature: float) -> GaussianMixtureSampler:
        """The same mixture sampled at another covariance scale."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return replace(self, temperature=float(temperature))

    def sample(self, n: int, label_index: int | None, seed: int) -> Tensor:
        """``n`` float32 codes (n, D) for ``label_index`` (None: unconditional), deterministic in ``seed``."""
        key = UNCONDITIONAL if label_index is None else int(label_index)
        if key not in self.components:
            raise ValueError(
                f"no latent mixture fitted for label index {label_index}; have {sorted(self.components)}"
            )
        w, means, tril = self.components[key]
        g = torch.Generator().manual_seed(int(seed))
        comp = torch.multinomial(w, n, replacement=True, generator=g)
        eps = torch.randn(n, means.shape[1], generator=g, dtype=torch.float64)
        # Covariance * T is the Cholesky factor * sqrt(T).
        return (
            means[comp] + math.sqrt(self.temperature) * torch.einsum("nij,nj->ni", tril[comp], eps)
        ).float()

    def to_files(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON metadata and named tensors, for ``sampler.json`` and ``sampler.safetensors``."""
        tensors: dict[str, Tensor] = {}
        for c, (w, m, t) in self.components.items():
            tensors[f"label{c}.weights"], tensors[f"label{c}.means"], tensors[f"label{c}.scale_tril"] = (
                w,
                m,
                t,
            )
        return {**self.meta, "temperature": self.temperature}, {k: v.contiguous() for k, v in tensors.items()}

    @classmethod
    def from_files(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> GaussianMixtureSampler:
        """Rebuild a sampler from :meth:`to_files`' output."""
        keys = sorted({int(k.split(".")[0].removeprefix("label")) for k in tensors})
        comps = {
            c: (tensors[f"label{c}.weights"], tensors[f"label{c}.means"], tensors[f"label{c}.scale_tril"])
            for c in keys
        }
        meta = dict(meta)
        return cls(comps, meta, float(meta.pop("temperature", 1.0)))


def fit_for_model(
    model: Any, images: np.ndarray, labels: np.ndarray | None, *, seed: int = 0
) -> GaussianMixtureSampler:
    """Fit the sampler of a trained model on the posterior means of its training images.

    Args:
        model: the trained ConvVAE.
        images: its uint8 training images (N, H, W).
        labels: their label indices for a conditional model, else None.
        seed: the fitting seed.
    """
    from medvae.anomaly.stats import posterior_means

    mu = posterior_means(model, images, labels if model.n_cond else None)
    return GaussianMixtureSampler.fit(mu, labels if model.n_cond else None, seed=seed)


def load_sampler(model_dir: Any) -> GaussianMixtureSampler | None:
    """The sampler saved in a model directory, or None for a model directory without one."""
    from pathlib import Path

    from medvae.vae.artifacts import read_json, read_tensors

    if not (Path(model_dir) / SAMPLER_JSON).is_file():
        return None
    return GaussianMixtureSampler.from_files(
        read_json(model_dir, SAMPLER_JSON), read_tensors(model_dir, SAMPLER_TENSORS)
    )
