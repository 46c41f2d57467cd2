"""Measure the privacy filter on real chest X-rays: the floor, the catch rate and the run time.

On ImageFolder training images (e.g. ../shared/data/kermany_train), prepared as ingest does (64x64,
CLAHE), it prints:

1. How far disguised copies are from their source, plain and shift/flip-tolerant: JPEG re-encodes of
   the *source file* (quality 75-95, re-ingested) and of the stored 64x64 image, 1-4 px shifts, mirror
   images, and all three at once; against the distance from each image to the nearest image of *another
   patient*. This is what DUPLICATE_DISTANCE and MIN_THRESHOLD in medvae/synth/privacy.py rest on.
2. The threshold with and without a re-encoded duplicate in the training set.
3. :func:`medvae.synth.privacy.catch_rate` (planted copies caught, real held-out images rejected) with
   ~1300 and ~3600 training images, with and without near-duplicates in the training set, and the wall
   time of ``privacy_filter`` for 2000 samples against each (time ratios are measured in one run).

Usage: uv run python benchmarks/privacy_filter.py ../shared/data/kermany_train [--cache /tmp/k.npz]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medvae.config import IngestConfig
from medvae.data.prepare import stored_image
from medvae.data.readers import decode_bytes
from medvae.eval.study import load_image_folder, standardise_intensity
from medvae.synth.privacy import (
    catch_rate,
    jpeg_reencode,
    nearest_neighbour_distances,
    privacy_filter,
    shifted,
    threshold_report,
    tolerant_nearest,
)


def load(root: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            return z["images"], z["groups"], z["names"]
    cfg = IngestConfig()
    data, _ = load_image_folder(root, ingest_cfg=cfg)
    imgs = standardise_intensity(data.images, cfg.intensity, cfg.clahe_clip_limit)
    if cache is not None:
        np.savez(cache, images=imgs, groups=data.groups, names=data.names)
    return imgs, data.groups, data.names


def source_reencode(path: Path, quality: int) -> np.ndarray:
    # The scenario of issue 11.2: the same scan exported again (new bytes), then ingested as usual.
    cfg = IngestConfig()
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return stored_image(decode_bytes(buf.getvalue(), path.name, cfg)[0].pixels, cfg)


def variants(
    imgs: np.ndarray, names: np.ndarray, root: Path, idx: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(75, 96, size=len(idx))
    s = [(int(a), int(b)) for a, b in rng.integers(-4, 5, size=(len(idx), 2))]
    s = [(a, b) if (a, b) != (0, 0) else (1, -1) for a, b in s]
    return {
        "jpeg_source": np.stack(
            [source_reencode(root / names[k], int(qq)) for k, qq in zip(idx, q, strict=True)]
        ),
        "jpeg_64px": np.stack([jpeg_reencode(imgs[k], int(qq)) for k, qq in zip(idx, q, strict=True)]),
        "shift_1px": np.stack([shifted(imgs[k], 1, 0) for k in idx]),
        "shift_2px": np.stack([shifted(imgs[k], 2, 0) for k in idx]),
        "shift_<=4px": np.stack([shifted(imgs[k], *sh) for k, sh in zip(idx, s, strict=True)]),
        "flip": imgs[idx][:, :, ::-1].copy(),
        "flip_shift_jpeg": np.stack(
            [
                jpeg_reencode(shifted(imgs[k][:, ::-1], *sh), int(qq))
                for k, sh, qq in zip(idx, s, q, strict=True)
            ]
        ),
    }


def floor_figures(imgs: np.ndarray, groups: np.ndarray, names: np.ndarray, root: Path) -> None:
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(imgs), size=300, replace=False))
    print("== 1. distance of disguised copies to their source (RMS, [0, 1] units): max / 99% / median")
    for kind, v in variants(imgs, names, root, idx, seed=1).items():
        plain = np.sqrt(((v.astype(float) - imgs[idx]) ** 2).mean(axis=(1, 2))) / 255
        tol = np.array(
            [tolerant_nearest(v[k : k + 1], imgs[j : j + 1]).distances[0] for k, j in enumerate(idx)]
        )
        print(
            f"  {kind:16s} plain {plain.max():.3f} / {np.quantile(plain, 0.99):.3f} / {np.median(plain):.3f}"
            f"   tolerant {tol.max():.3f} / {np.quantile(tol, 0.99):.3f} / {np.median(tol):.3f}"
        )
    # Distinct patients: images of one half of the patients against all images of the other half.
    pats = np.unique(groups)
    half = np.isin(groups, rng.choice(pats, size=len(pats) // 2, replace=False))
    q = rng.choice(np.flatnonzero(half), size=600, replace=False)
    ref = imgs[~half]
    po = nearest_neighbour_distances(imgs[q], ref)
    t0 = time.perf_counter()
    to = tolerant_nearest(imgs[q], ref, cap=0.12).distances
    print(
        f"  nearest other patient, plain   : min {po.min():.3f}, 1% {np.quantile(po, 0.01):.3f}, "
        f"median {np.median(po):.3f} (600 images vs {len(ref)} of other patients)"
    )
    print(
        f"  nearest other patient, tolerant: min {to.min():.3f}, 1% {np.quantile(to, 0.01):.3f}, "
        f"share < 0.08 {np.mean(to < 0.08):.4f}, < 0.10 {np.mean(to < 0.10):.4f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )


def threshold_figures(imgs: np.ndarray) -> None:
    train = imgs[:1300]
    clean = threshold_report(train, 0.01, floor=0.0, duplicate_distance=0.0)
    dirty = np.concatenate([train, jpeg_reencode(train[0], 90)[None]])
    naive = threshold_report(dirty, 0.01, floor=0.0, duplicate_distance=0.0)
    robust = threshold_report(dirty, 0.01)
    print("== 2. 1% threshold on 1300 training images (plain RMS)")
    print(
        f"  clean {clean.threshold:.3f}; one JPEG-q90 duplicate added: old rule {naive.threshold:.3f}, "
        f"robust {robust.threshold:.3f} ({robust.near_duplicates} near-duplicate images left out)"
    )


def catch_figures(imgs: np.ndarray, groups: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    pats = np.unique(groups)
    held = np.isin(groups, rng.choice(pats, size=len(pats) // 3, replace=False))
    pool, samples = np.flatnonzero(~held), imgs[held][:2000]
    print(f"== 3. catch rate and run time: {len(samples)} held-out real images of other patients as samples")
    for m in (1300, 3600):
        train = imgs[rng.choice(pool, size=min(m, len(pool)), replace=False)]
        thr = threshold_report(train, 0.01).threshold
        t0 = time.perf_counter()
        plain_only = nearest_neighbour_distances(samples, train)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = privacy_filter(samples, train, thr)
        t_filter = time.perf_counter() - t0
        print(
            f"  train {len(train)}: privacy_filter {t_filter:.1f} s (plain distances alone {t_plain:.1f} s, "
            f"ratio {t_filter / t_plain:.2f}); held-out real rejected {res.rejection_rate:.3%} "
            f"(plain check alone {np.mean(plain_only < thr):.3%}), threshold {thr:.3f}"
        )
        for dups in (0, 20):
            rep = catch_rate(samples[:500], train, n_planted=500, train_duplicates=dups, seed=m + dups)
            print(
                f"    near-duplicates planted in train {dups:2d}: caught {rep['caught']}, "
                f"FNR {rep['false_negative_rate']:.3f}, threshold {rep['threshold']:.3f}, "
                f"held-out rejected {rep['sample_rejection_rate']:.3%}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--cache", type=Path, default=None, help="npz cache of the prepared images")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: floor,threshold,catch")
    a = p.parse_args()
    imgs, groups, names = load(a.root, a.cache)
    skip = set(a.skip.split(","))
    if "floor" not in skip:
        floor_figures(imgs, groups, names, a.root)
    if "threshold" not in skip:
        threshold_figures(imgs)
    if "catch" not in skip:
        catch_figures(imgs, groups)


if __name__ == "__main__":
    main()
