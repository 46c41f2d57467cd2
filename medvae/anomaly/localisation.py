"""Does a heat map point at the lungs? A population lung mask and the share of heat inside it.

There are no lesion outlines in the data medvae is evaluated on, so the measurable check is anatomical:
an abnormality score that reads pneumonia should put its heat in the lung fields, more so for
pneumonia than for normal chests. The mask comes from the mean training normal, which every model
directory keeps in its calibration (:attr:`medvae.anomaly.calibration.Calibration.mean_image`).
"""

from __future__ import annotations

import numpy as np


def lung_mask(mean_image: np.ndarray) -> np.ndarray:
    """A two-field lung mask from the mean of the training normals.

    The mean chest is smoothed (Gaussian, 1 px); the body is every pixel above half the image's Otsu
    threshold, holes filled, eroded 3 px (which drops the dark background and the body's edge); the lungs
    are the body pixels darker than the Otsu threshold of the body, opened 1 px, its two largest
    components, closed 2 px, holes filled. On kermany_train at 64 px it covers two lung fields, 25 % of
    the image, and leaves out the mediastinum, the diaphragm, the shoulders and the neck.

    Args:
        mean_image: (H, W), in [0, 1] or 0..255 (only the ordering of values matters).

    Returns:
        Boolean (H, W).

    Raises:
        ValueError: when the image has no body region, or no dark region inside it.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    m = ndi.gaussian_filter(np.asarray(mean_image, dtype=np.float64), 1.0)
    if np.ptp(m) <= 0:
        raise ValueError("the mean image is flat: no body region for a lung mask")
    body = ndi.binary_erosion(ndi.binary_fill_holes(m > 0.5 * threshold_otsu(m)), iterations=3)
    if not body.any():
        raise ValueError("the mean image has no body region for a lung mask")
    dark = ndi.binary_opening(body & (m < threshold_otsu(m[body])), iterations=1)
    labels, n = ndi.label(dark)
    if n == 0:
        raise ValueError("the mean image has no dark (lung) region inside the body")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    two = np.isin(labels, np.argsort(sizes)[::-1][:2] + 1)
    return np.asarray(ndi.binary_fill_holes(ndi.binary_closing(two, iterations=2)), dtype=bool)


def share_inside(maps: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The share of each map's heat (its values clipped at 0) that lies inside ``mask``.

    A map blind to anatomy puts on average the mask's area share inside it: that is the chance level,
    and share / chance is how many times more heat than chance falls in the lungs.

    Args:
        maps: (N, H, W) heat maps.
        mask: boolean (H, W).

    Returns:
        ``(shares, chance)``: (N,) float64 (0 for a map without heat) and the mask's area share.

    Raises:
        ValueError: for a mask of another shape than the maps.
    """
    a = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    if a.shape[1:] != np.shape(mask):
        raise ValueError(f"mask {np.shape(mask)} does not match maps {a.shape[1:]}")
    a = a.reshape(len(a), -1)
    inside = np.asarray(mask, dtype=np.float64).ravel()
    total = a.sum(axis=1)
    shares = np.divide(a @ inside, total, out=np.zeros_like(total), where=total > 0)
    return shares, float(inside.mean())


# A lung mask outside these bounds is not two lung fields (a flat or non-chest mean image).
ROI_MIN_SHARE, ROI_MAX_SHARE = 0.05, 0.6


def region_of_interest(mean_image: np.ndarray) -> np.ndarray:
    """Where the low-pass error score counts: the lung fields, or the whole image if none are found.

    Args:
        mean_image: the mean training image (H, W); empty gives an empty region (the whole image).

    Returns:
        Boolean (H, W) (all True when :func:`lung_mask` fails or covers an implausible share).
    """
    mean_image = np.asarray(mean_image)
    if not mean_image.size:
        return np.zeros((0, 0), dtype=bool)
    try:
        mask = lung_mask(mean_image)
    except ValueError:
        return np.ones(mean_image.shape, dtype=bool)
    if not ROI_MIN_SHARE <= float(mask.mean()) <= ROI_MAX_SHARE:
        return np.ones(mean_image.shape, dtype=bool)
    return mask
