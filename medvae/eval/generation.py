"""How good the synthetic images are, in the feature space of a classifier trained on real images.

Nothing is downloaded: the feature extractor is the fixed utility CNN (:mod:`medvae.eval.classifier`)
trained on the same fraction's real images, and its penultimate layer (after global pooling) is the space
for all three figures:

* **Fréchet distance** to the real test images, through MONAI's :class:`~monai.metrics.FIDMetric`
  (an "FID" in a domain network's features, not Inception's, so compare it only within this report);
* **precision and recall** of k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019): the share of
  synthetic images inside the real manifold, and of real images inside the synthetic one;
* **label fidelity**: the AUROC with which the real-trained classifier separates the synthetic images by
  the label they were generated for (1.0: every "pneumonia" image looks more like pneumonia than every
  "normal" one; 0.5: the label is ignored).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.linalg import LinAlgWarning

from medvae.eval.classifier import SmallCNN, predict_proba

# k of the k-NN manifolds: Kynkäänniemi et al.'s default, which they found robust for precision and recall.
KNN_K = 3


@dataclass(frozen=True)
class GenerationQuality:
    """Synthetic images against the real test images.

    Attributes:
        n_synthetic: the synthetic images measured.
        n_real: the real images they are compared with.
        fd: Fréchet distance of the two feature sets (0: the same Gaussian).
        precision: the share of synthetic images inside the real k-NN manifold.
        recall: the share of real images inside the synthetic k-NN manifold.
        label_fidelity: AUROC of the classifier's positive-class probability against the intended label
            (None unless both labels were generated).
    """

    n_synthetic: int
    n_real: int
    fd: float
    precision: float
    recall: float
    label_fidelity: float | None

    def metrics(self) -> dict[str, float | int | None]:
        """The JSON figures."""
        return asdict(self)


@torch.no_grad()
def cnn_features(model: SmallCNN, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The classifier's pooled penultimate features of uint8 images (N, H, W), float64 (N, C)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])).to(device)
        x = x.float().div_(255.0)[:, None].contiguous(memory_format=torch.channels_last)
        out.append(model.features(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, C) and (M, C), via MONAI."""
    from monai.metrics import FIDMetric

    with warnings.catch_warnings():
        # Fewer images than feature channels give a singular covariance; its square root is still the
        # right one for the distance (scipy warns, the value agrees with an eigendecomposition).
        warnings.simplefilter("ignore", LinAlgWarning)
        value = FIDMetric()(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    # scipy's sqrtm can leave a negligible imaginary part, which MONAI drops; a tiny negative is round-off.
    return max(float(value), 0.0)


def _kth_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # k + 1: each point's zero distance to itself


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Args:
        real: real features (N, C), N > k.
        fake: synthetic features (M, C), M > k.
        k: the neighbour whose distance is each point's ball radius.

    Returns:
        ``(precision, recall)``: the share of fake points inside the union of real balls, and of real
        points inside the union of fake balls.

    Raises:
        ValueError: when either set has k points or fewer.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision and recall need more than k={k} points a set: {len(real)}, {len(fake)}")
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    d_fr = torch.cdist(f, r)  # (fake, real)
    precision = (d_fr <= _kth_radius(r, k)[None, :]).any(dim=1).double().mean()
    d_rf = d_fr.T
    recall = (d_rf <= _kth_radius(f, k)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def label_fidelity(p_positive: np.ndarray, intended: np.ndarray) -> float | None:
    """AUROC of a real-trained classifier's positive-class probability against the intended labels."""
    from sklearn.metrics import roc_auc_score

    intended = np.asarray(intended)
    if len(np.unique(intended)) < 2:
        return None
    return float(roc_auc_score(intended, np.asarray(p_positive)))


def generation_quality(
    classifier: SmallCNN, synthetic: np.ndarray, intended: np.ndarray, real: np.ndarray
) -> GenerationQuality | None:
    """All three figures for synthetic images (uint8 (M, H, W), labels 0/1) against real ones.

    Returns:
        None when either set is too small for k-NN manifolds (``KNN_K`` images or fewer).
    """
    if min(len(synthetic), len(real)) <= KNN_K:
        return None
    f_syn, f_real = cnn_features(classifier, synthetic), cnn_features(classifier, real)
    precision, recall = knn_precision_recall(f_real, f_syn)
    return GenerationQuality(
        n_synthetic=len(synthetic),
        n_real=len(real),
        fd=frechet_distance(f_syn, f_real),
        precision=precision,
        recall=recall,
        label_fidelity=label_fidelity(predict_proba(classifier, synthetic)[:, 1], intended),
    )
