"""The evaluation's localisation check: do the heat maps of the deciding score fall on the lungs?

For a seeded random sample of abnormal and normal test images, the heat maps of the calibrated score
(:func:`medvae.anomaly.heatmaps.score_maps`, the maps ``medvae screen --heatmaps`` writes) are measured
against the lung mask of the mean training normal (:mod:`medvae.anomaly.localisation`). A map that reads
disease puts more of its heat inside the lungs than chance (the mask's area share), and more for abnormal
than for normal chests; its total heat should track the score.

The default score counts only the lungs, so its map lies there by construction and sums to the score.
The check then also measures the same low-pass error over the whole image: whether the model's own
error, unmasked, gathers in the lungs of abnormal chests. That is the part the mask cannot fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae.anomaly.calibration import Calibration
from medvae.vae.model import ConvVAE


@dataclass(frozen=True)
class LocalisationCheck:
    """The heat maps' lung share on a sample of test images (one seed).

    Attributes:
        n_abnormal: abnormal test images measured.
        n_normal: normal test images measured.
        chance: the lung mask's share of the image (the share of a map blind to anatomy).
        share_abnormal: mean share of heat inside the lungs, abnormal images.
        share_normal: the same for normal images.
        spearman_abnormal: rank correlation of an abnormal image's total heat with its score.
        mask_error: why no lung mask could be made (the other fields are then empty), else "".
        lungs_only: whether the deciding score counts only the lung fields (the low-pass error with a
            lung region): its heat then lies in the lungs by construction and its total is the score, so
            the share and the Spearman say nothing; the unmasked shares below do.
        unmasked_abnormal: for a lungs-only score, the lung share of the same error over the whole image,
            abnormal images; None otherwise.
        unmasked_normal: the same for normal images.
    """

    n_abnormal: int
    n_normal: int
    chance: float | None
    share_abnormal: float | None
    share_normal: float | None
    spearman_abnormal: float | None
    mask_error: str = ""
    lungs_only: bool = False
    unmasked_abnormal: float | None = None
    unmasked_normal: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The JSON figures, with the abnormal share as a multiple of chance."""
        ratio = (
            self.share_abnormal / self.chance
            if self.share_abnormal is not None and self.chance
            else None
        )
        return {
            "n_abnormal": self.n_abnormal,
            "n_normal": self.n_normal,
            "chance": self.chance,
            "share_abnormal": self.share_abnormal,
            "share_normal": self.share_normal,
            "abnormal_x_chance": ratio,
            "spearman_abnormal": self.spearman_abnormal,
            "mask_error": self.mask_error,
            "lungs_only": self.lungs_only,
            "unmasked_abnormal": self.unmasked_abnormal,
            "unmasked_normal": self.unmasked_normal,
        }


def _sample(candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    if len(candidates) <= k:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False))


def _class_means(shares: np.ndarray, n_ab: int) -> tuple[float | None, float | None]:
    """Mean share of the first ``n_ab`` (abnormal) maps and of the rest (normal); None for an empty class."""
    ab, no = shares[:n_ab], shares[n_ab:]
    return (float(ab.mean()) if len(ab) else None, float(no.mean()) if len(no) else None)


def check_localisation(
    model: ConvVAE,
    cal: Calibration,
    test_images: np.ndarray,
    test_y: np.ndarray,
    scores: np.ndarray,
    k: int,
    seed: int,
) -> tuple[LocalisationCheck, np.ndarray, np.ndarray]:
    """Heat maps of up to ``k`` abnormal and ``k`` normal test images and their lung shares.

    Args:
        model: the trained anomaly VAE.
        cal: its calibration (score, latent reference, mean training image, region of interest).
        test_images: uint8 (N, H, W), as the model scores them.
        test_y: 0/1 per test image.
        scores: the calibrated score of each test image.
        k: images per class.
        seed: the sample's seed.

    Returns:
        The check, the sampled test positions (into ``test_images``) and their maps (for the figure).
    """
    from scipy.stats import spearmanr

    from medvae.anomaly.heatmaps import lowpass_maps, score_maps
    from medvae.anomaly.localisation import lung_mask, share_inside

    ab = _sample(np.flatnonzero(test_y == 1), k, seed)
    no = _sample(np.flatnonzero(test_y == 0), k, seed + 1)
    picks = np.concatenate([ab, no])
    maps = score_maps(model, test_images[picks], cal)
    try:
        mask = lung_mask(cal.mean_image)
    except ValueError as exc:
        return LocalisationCheck(len(ab), len(no), None, None, None, None, str(exc)), picks, maps
    shares, chance = share_inside(maps, mask)
    rho = None
    if len(ab) >= 3 and np.ptp(scores[ab]) > 0:
        rho = float(spearmanr(maps[: len(ab)].sum(axis=(1, 2)), scores[ab]).statistic)
    lungs_only = cal.score == "lowpass_error" and cal.roi_is_lungs
    unmasked: tuple[float | None, float | None] = (None, None)
    if lungs_only:
        # The whole-image error, where the mask does not decide where the heat may go.
        whole = lowpass_maps(model, test_images[picks], cal, whole_image=True)
        unmasked = _class_means(share_inside(whole, mask)[0], len(ab))
    share_ab, share_no = _class_means(shares, len(ab))
    check = LocalisationCheck(
        n_abnormal=len(ab),
        n_normal=len(no),
        chance=chance,
        share_abnormal=share_ab,
        share_normal=share_no,
        spearman_abnormal=rho,
        lungs_only=lungs_only,
        unmasked_abnormal=unmasked[0],
        unmasked_normal=unmasked[1],
    )
    return check, picks, maps


def heatmap_figure(
    images: np.ndarray, maps: np.ndarray, captions: list[str], path: Path, columns: int = 3
) -> Path:
    """One PNG of heat-map tiles (scan | overlay | colour bar, caption), on one shared colour scale."""
    from medvae._io import write_png
    from medvae.anomaly.heatmaps import heatmap_tile

    top = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    tiles = [heatmap_tile(img, m, c, top) for img, m, c in zip(images, maps, captions, strict=True)]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * (h + 6), columns * (w + 6), 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * (h + 6) : r * (h + 6) + t.shape[0], c * (w + 6) : c * (w + 6) + t.shape[1]] = t
    return write_png(canvas, path)
