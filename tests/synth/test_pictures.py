"""Picture grids: torchvision layout, deterministic atomic PNGs, synthetic vs real-image pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvae.synth.pictures import (
    grid_array,
    label_sample_grids,
    real_interpolation_grid,
    real_reconstruction_grid,
    sample_grid,
    save_grid,
    with_caption,
)
from medvae.synth.sample import sample_images
from tests.synth.helpers import SIZE, noise_images, tiny_vae


def test_save_grid_layout_and_bytes(tmp_path: Path) -> None:
    imgs = noise_images(10)
    p = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=4, pad=2, pad_value=9)
    with Image.open(p) as im:
        assert im.size == (4 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2) and im.mode == "L"
        arr = np.asarray(im)
    # Image k sits at row k // 4, column k % 4; padding and the empty last cells are pad_value.
    for k in (0, 5, 9):
        r, c = divmod(k, 4)
        top, left = 2 + r * (SIZE + 2), 2 + c * (SIZE + 2)
        np.testing.assert_array_equal(arr[top : top + SIZE, left : left + SIZE], imgs[k])
    assert arr[0, 0] == 9 and arr[-3, -3] == 9
    assert [q.name for q in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp files left behind
    again = save_grid(imgs, tmp_path / "again.png", nrow=4, pad=2, pad_value=9)
    assert again.read_bytes() == p.read_bytes()  # deterministic
    with pytest.raises(ValueError):
        grid_array(imgs.astype(np.float32))
    with pytest.raises(ValueError):
        grid_array(imgs, nrow=0)


def test_caption_strip_is_drawn_and_wrapped() -> None:
    grid = np.zeros((20, 200), dtype=np.uint8)
    out = with_caption(grid, "label NORMAL · model abcdef123456 · seed 7")
    assert out.shape[1] == 200 and out.shape[0] > 20
    np.testing.assert_array_equal(out[-20:], grid)
    assert out[:-20].max() > 200 and (out[:-20] > 128).sum() > 50  # text was drawn (anti-aliased)
    narrow = with_caption(np.zeros((20, 60), dtype=np.uint8), "label NORMAL · model abcdef123456 · seed 7")
    assert narrow.shape[0] > out.shape[0]  # wrapped onto more lines instead of cut off


def test_save_grid_with_caption(tmp_path: Path) -> None:
    imgs = noise_images(6)
    p = save_grid(imgs, tmp_path / "c.png", nrow=3, caption="synthetic · label x · seed 1")
    with Image.open(p) as im:
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr, with_caption(grid_array(imgs, nrow=3), "synthetic · label x · seed 1"))
    assert arr.shape[0] > grid_array(imgs, nrow=3).shape[0]


def test_sample_grid_is_synthetic_only(tmp_path: Path) -> None:
    model = tiny_vae()
    p = sample_grid(model, tmp_path / "s.png", 6, seed=3, nrow=3)
    with Image.open(p) as im:
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr, grid_array(sample_images(model, 6, seed=3), nrow=3))
    captioned = sample_grid(model, tmp_path / "c.png", 6, seed=3, nrow=3, caption="hello")
    with Image.open(captioned) as im:
        assert im.size[1] > arr.shape[0]


def test_label_sample_grids(tmp_path: Path) -> None:
    model = tiny_vae(conditional=True)
    paths = label_sample_grids(
        model, tmp_path, ["NORMAL", "a/b", "c"], model_hash="f" * 64, seed=2, n=4, nrow=4
    )
    assert sorted(p.name for p in paths.values()) == [
        "samples_NORMAL.png",
        "samples_a_b.png",
        "samples_c.png",
    ]
    pix = []
    for k, p in enumerate(paths.values()):
        with Image.open(p) as im:
            arr = np.asarray(im)
        body = arr[-(SIZE + 4) :]
        np.testing.assert_array_equal(
            body, grid_array(sample_images(model, 4, label_index=k, seed=2000 + k), 4)
        )
        pix.append(body)
    assert not np.array_equal(pix[0], pix[1])
    with pytest.raises(ValueError):
        label_sample_grids(tiny_vae(), tmp_path, ["x"], model_hash="h", seed=0)


def test_real_reconstruction_and_interpolation_grids(tmp_path: Path) -> None:
    model = tiny_vae()
    imgs = noise_images(10)
    p = real_reconstruction_grid(model, imgs, tmp_path / "recon.png", n=6, nrow=4)
    with Image.open(p) as im:
        # Two blocks of (originals row, reconstructions row), 4 wide.
        assert im.size == (4 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)
        np.testing.assert_array_equal(np.asarray(im)[2 : 2 + SIZE, 2 : 2 + SIZE], imgs[0])
    p = real_interpolation_grid(model, imgs[0], imgs[1], tmp_path / "interp1.png", steps=5)
    with Image.open(p) as im:
        assert im.size == (7 * (SIZE + 2) + 2, SIZE + 4)
    p = real_interpolation_grid(model, imgs[:3], imgs[3:6], tmp_path / "interp3.png", steps=4)
    with Image.open(p) as im:
        assert im.size == (6 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    cmodel = tiny_vae(conditional=True)
    with pytest.raises(ValueError):
        real_interpolation_grid(cmodel, imgs[0], imgs[1], tmp_path / "c.png")
    real_interpolation_grid(cmodel, imgs[0], imgs[1], tmp_path / "c.png", label=1)
    real_reconstruction_grid(cmodel, imgs, tmp_path / "cr.png", labels=[0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
