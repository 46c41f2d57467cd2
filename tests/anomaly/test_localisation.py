"""Tests for the lung mask of the mean normal and the share of heat inside it."""

from __future__ import annotations

import numpy as np
import pytest

from medvae.anomaly.localisation import lung_mask, region_of_interest, share_inside


def _mean_chest(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A bright body on a dark background with two dark lung fields; returns (image, true lungs)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.45) ** 2 < 1
    lungs = np.zeros_like(body)
    for cx in (0.32, 0.68):
        lungs |= ((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2 < 1
    img = np.where(body, 200.0, 10.0)
    img[lungs] = 90.0
    return img, lungs


def test_the_mask_finds_the_two_lung_fields_of_a_mean_chest() -> None:
    img, truth = _mean_chest()
    mask = lung_mask(img)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.7
    assert mask[:, :32].any() and mask[:, 32:].any()  # one field on each side
    assert not mask[0].any() and not mask[:, 0].any()  # not the background


def test_share_inside_is_one_for_heat_in_the_mask_and_chance_for_uniform_heat() -> None:
    _, truth = _mean_chest()
    inside = truth.astype(np.float64) * 3.0
    uniform = np.ones_like(inside)
    outside = (~truth).astype(np.float64)
    negative = -uniform  # no heat at all once clipped
    shares, chance = share_inside(np.stack([inside, uniform, outside, negative]), truth)
    assert chance == pytest.approx(truth.mean())
    assert shares == pytest.approx([1.0, truth.mean(), 0.0, 0.0])


def test_a_flat_mean_image_or_a_wrong_mask_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="flat"):
        lung_mask(np.full((64, 64), 0.5))
    with pytest.raises(ValueError, match="does not match"):
        share_inside(np.zeros((1, 8, 8)), np.zeros((4, 4), bool))


def test_the_region_of_interest_is_the_lungs_or_else_the_whole_image() -> None:
    img, _ = _mean_chest()
    np.testing.assert_array_equal(region_of_interest(img), lung_mask(img))
    # No lung fields (flat, or one dark blob over most of the image): the score counts every pixel.
    assert region_of_interest(np.full((64, 64), 0.5)).all()
    dark = np.full((64, 64), 200.0)
    dark[2:-2, 2:-2] = 10.0
    assert region_of_interest(dark).shape == (64, 64) and region_of_interest(dark).all()
    assert region_of_interest(np.zeros((0, 0))).size == 0  # an old calibration without a mean image
