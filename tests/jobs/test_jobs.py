"""Tests for the stage jobs that join the store to training and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvae.config import IngestConfig, ModelConfig, TrainConfig
from medvae.data.deid import keyed_hash
from medvae.data.ingest import ingest
from medvae.data.store import Store, images_from
from medvae.jobs.screen import Screener, screen_files, screen_job
from medvae.jobs.train import train_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scans(root: Path, n: int = 24) -> list[Path]:
    """Low-contrast, unevenly exposed 'scans': CLAHE changes them a lot, so a mismatch would show."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    paths = []
    for i in range(n):
        img = 90 + 20 * np.sin(xx / (4.0 + i % 5)) + 0.2 * yy * (i % 3) + rng.normal(0, 3, xx.shape)
        p = root / "normal" / f"IM-{i:04d}-0001.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Store, list[Path]]:
    """A tiny model trained on a CLAHE store of 24 scans: the model folder, the store and the scans."""
    root = tmp_path_factory.mktemp("trained")
    paths = _scans(root / "src")
    store = Store(root / "store")
    ingest([root / "src"], store, IngestConfig(workers=1, intensity="clahe"))
    tiny = TrainConfig(
        model=ModelConfig(channels=(8, 16), latent_dim=4), epochs=1, batch_size=8, patience=1, device="cpu"
    )
    train_job(store.uri, root / "model", tiny, progress=False)
    return root / "model", store, paths


def test_screen_prepares_new_scans_exactly_like_the_training_store(
    trained: tuple[Path, Store, list[Path]],
) -> None:
    model, store, paths = trained
    res = screen_job(model, [paths[0].parent.parent])
    assert res.scored == len(paths) and res.rejected == 0
    by_file = {Path(r.file).name: r.scores["score"] for r in res.records}

    table = store.read()
    ids = table.column("id").to_pylist()
    stored = images_from(table)
    key = store.key()
    order = [ids.index(keyed_hash(key, "source", p.read_bytes())[:32]) for p in paths]
    screener = Screener.load(model)
    expected = screener.score(stored[order])["score"]
    np.testing.assert_allclose([by_file[p.name] for p in paths], expected, rtol=1e-5)

    # The comparison can fail: without the store's CLAHE the same scans score differently.
    plain = Screener(screener.loaded, screener.calibration, IngestConfig(intensity="none"))
    records, _ = screen_files(plain, [(str(p), None) for p in paths])
    plain_scores = {Path(r.file).name: r.scores["score"] for r in records}
    assert not np.allclose([plain_scores[p.name] for p in paths], expected, rtol=1e-3)


def test_a_screen_of_unlike_scans_says_so_and_one_of_the_cohort_does_not(
    trained: tuple[Path, Store, list[Path]], tmp_path: Path
) -> None:
    """A batch unlike the training scans (here: noise) is flagged wholesale, and the run says it may be
    blind there; the cohort's own scans, at a threshold set on them, are not, and it says nothing."""
    import shutil

    from medvae.jobs.screen import recalibrate_job

    model0, _, paths = trained
    model = tmp_path / "model"
    shutil.copytree(model0, model)
    # A tiny model's threshold comes from two or three val scans, so its own cohort's flagged share is
    # anyone's guess; set on these 24 scans at 5 %, it flags at most 2 of them by construction.
    recalibrate_job(model, [paths[0].parent.parent])
    cohort = screen_job(model, [paths[0].parent.parent])
    assert cohort.scored == 24 and cohort.flagged <= 2
    assert not any("of 24 scans" in w for w in cohort.warnings)
    rng = np.random.default_rng(5)
    (tmp_path / "noise").mkdir()
    for i in range(24):
        noise = rng.integers(0, 256, (96, 80), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "noise" / f"IM-{500 + i:04d}-0001.png")
    unlike = screen_job(model, [tmp_path / "noise"])
    assert unlike.scored == 24 and unlike.flagged >= 12
    assert any(f"flagged {unlike.flagged} of 24 scans" in w for w in unlike.warnings)
    # Noise is what the low-pass error can miss: the latent guard is what flags it, and says so.
    assert unlike.counts()["unlike"] >= 12
    assert any(f"{unlike.unlike} scan(s) lie far outside" in w for w in unlike.warnings)
    assert not cohort.unlike and not any("lie far outside" in w for w in cohort.warnings)


def test_screen_rejects_a_fifo_and_an_oversized_file_without_reading_them(
    trained: tuple[Path, Store, list[Path]], tmp_path: Path
) -> None:
    import os

    model, _, paths = trained
    os.mkfifo(tmp_path / "pipe.png")  # reading it would block the screen for ever
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50_000)
    screener = Screener.load(model)
    small = Screener(screener.loaded, screener.calibration, IngestConfig(max_file_bytes=40_000))
    files = [(str(tmp_path / "pipe.png"), None), (str(big), None), (str(paths[0]), None)]
    records, images = screen_files(small, files)
    reasons = [r.reason or "" for r in records]
    assert reasons[0].startswith("not a regular file"), reasons
    assert "over max_file_bytes=40000" in reasons[1], reasons
    assert [r.status for r in records] == ["rejected", "rejected", "scored"] and len(images) == 1


def test_trained_models_are_signed_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    """Training signs with the store's key; augment refuses an edited threshold whose hash was redone."""
    import json

    from medvae.config import AugmentConfig
    from medvae.jobs.augment import generate_synthetic
    from medvae.jobs.screen import model_threshold_warnings, recalibrate_job
    from medvae.vae.artifacts import SIGNATURE, finalize, load_model

    _scans(tmp_path / "src")
    store = Store(tmp_path / "store")
    ingest([tmp_path / "src"], store, IngestConfig(workers=1))
    tiny = TrainConfig(
        model=ModelConfig(channels=(8, 16), latent_dim=4), epochs=1, batch_size=8, patience=1, device="cpu"
    )
    model = tmp_path / "model"
    train_job(store.uri, model, tiny, progress=False)
    assert load_model(model, key=store.key()).signature == "verified"
    generate_synthetic(model, store.uri, AugmentConfig(count=2))  # the genuine model is accepted

    # What an attacker with write access does: raise the threshold (nothing flagged) and redo the hash.
    cal = json.loads((model / "calibration.json").read_text())
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in model.iterdir():
        if f.is_file():
            (tampered / f.name).write_bytes(f.read_bytes())
    (tampered / "calibration.json").write_text(json.dumps({**cal, "threshold": 1e9}))
    finalize(tampered)
    load_model(tampered)  # the hash alone cannot tell
    with pytest.raises(ValueError, match="files changed after it was signed"):
        generate_synthetic(tampered, store.uri, AugmentConfig(count=2))

    # Recalibration changes the thresholds legitimately: the stale signature is removed and said so.
    assert any("training cohort" in w for w in model_threshold_warnings(model))
    res = recalibrate_job(model, [tmp_path / "src"])
    assert not (model / SIGNATURE).exists()
    assert any("no longer signed" in w for w in res.warnings)
    assert not any("training cohort" in w for w in model_threshold_warnings(model))  # set on local normals
    assert load_model(model, key=store.key()).signature == "unsigned"


def test_training_fits_the_detail_restoration_and_augment_applies_it(
    trained: tuple[Path, Store, list[Path]], tmp_path: Path
) -> None:
    """detail.json matches the decoded samples to the training images' sharpness; the restored and the
    plain recipes never share a row id; a model directory without it is refused with the way out."""
    import json
    import shutil

    from medvae.config import AugmentConfig
    from medvae.jobs.augment import generate_synthetic
    from medvae.synth.detail import DETAIL_JSON, sharpness
    from medvae.vae.artifacts import finalize, sign

    model, store, _ = trained
    rec = json.loads((model / DETAIL_JSON).read_text())
    fit = rec["sharpness"]["-1"]  # an unconditional model: one gain, under the unconditional key
    assert fit["decoded"] < fit["training_images"]  # a 1-epoch decoder is blurrier than its data
    assert fit["restored"] == pytest.approx(fit["training_images"], rel=0.02) and rec["gains"]["-1"] > 0

    restored, r1 = generate_synthetic(model, store.uri, AugmentConfig(count=6))
    plain, r2 = generate_synthetic(model, store.uri, AugmentConfig(count=6, restore_detail=False))
    assert r1.kept == r2.kept == 6
    assert not set(restored.column("id").to_pylist()) & set(plain.column("id").to_pylist())
    s_restored, s_plain = (sharpness(images_from(t)) for t in (restored, plain))
    assert s_restored > s_plain

    old = tmp_path / "old_model"  # as trained before detail restoration existed
    shutil.copytree(model, old)
    (old / DETAIL_JSON).unlink()
    finalize(old)
    sign(old, store.key())
    with pytest.raises(ValueError, match=r"no detail restoration.*restore_detail=false"):
        generate_synthetic(old, store.uri, AugmentConfig(count=2))
    assert generate_synthetic(old, store.uri, AugmentConfig(count=2, restore_detail=False))[1].kept == 2
