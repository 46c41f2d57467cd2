"""Tests for the anomaly-score table of medvae.eval.scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae.anomaly.calibration import calibrate
from medvae.anomaly.stats import SCORES, ledoit_wolf, mahalanobis, precision_from_cov, score_batch
from medvae.config import ModelConfig
from medvae.eval import scores as sc
from medvae.eval.anomaly import summarise_anomaly
from medvae.vae.model import ConvVAE


@pytest.fixture
def fitted() -> tuple[sc.Reference, np.ndarray]:
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(image_size=16, channels=(4, 8), latent_dim=3)).eval()
    rng = np.random.default_rng(0)
    train, val, test = (rng.integers(0, 256, (n, 16, 16), dtype=np.uint8) for n in (12, 6, 5))
    cal = calibrate(model, train, val, score="mahalanobis", fpr=0.2)
    return sc.fit_reference(model, train, val, cal), test


def test_the_pipeline_scores_come_first_and_every_entry_is_described() -> None:
    assert tuple(sc.REGISTRY)[: len(SCORES)] == SCORES  # the calibratable ones
    assert all(s.description for s in sc.REGISTRY.values())


def test_scores_equal_their_definitions(fitted: tuple[sc.Reference, np.ndarray]) -> None:
    ref, test = fitted
    got = sc.score_images(ref, sc.Images(test))
    assert list(got) == list(sc.REGISTRY)
    cal = ref.calibration
    base = score_batch(ref.model, test, stats=cal.stats, recon_kind="bce", roi=cal.roi)
    for k in SCORES:
        assert np.array_equal(got[k], base[k])
    # The low-pass error counts the calibration's region; the research twin counts every pixel.
    whole = score_batch(ref.model, test, stats=cal.stats, recon_kind="bce")["lowpass_error"]
    assert np.array_equal(got["lowpass_error_whole"], whole)
    assert cal.roi_is_lungs and (got["lowpass_error"] < whole).all()
    # [mu, logvar] Mahalanobis against the training normals' Ledoit-Wolf reference, computed by hand.
    with torch.no_grad():
        mu, lv = ref.model.encode(torch.from_numpy(test).float().div(255).unsqueeze(1))
    feats = np.concatenate([mu.double().numpy(), lv.double().numpy()], axis=1)
    assert np.allclose(got["mahalanobis_mu_logvar"], mahalanobis(feats, ref.mu_logvar_stats))
    assert ref.mu_logvar_stats.mean.shape == (6,)
    # combined_z: each part z-scored by the held-out normals' own mean and sd.
    z = sum((got[k] - ref.val[k].mean()) / ref.val[k].std() for k in ("mahalanobis", "recon"))
    assert np.allclose(got["combined_z"], z)
    # The val scores are filled in the same order; a z-score of the val images themselves has mean 0.
    assert list(ref.val) == list(sc.REGISTRY) and abs(ref.val["combined_z"].mean()) < 1e-9


def test_fit_stats_is_the_public_ledoit_wolf_reference() -> None:
    x = np.random.default_rng(1).normal(size=(20, 4))
    mean, cov, _ = ledoit_wolf(x)
    st = sc.fit_stats(x)
    assert np.allclose(st.mean, mean) and np.allclose(st.precision, precision_from_cov(cov))


def test_adding_a_score_is_one_entry(
    fitted: tuple[sc.Reference, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, test = fitted
    table = dict(sc.REGISTRY)
    table["kl_minus_recon"] = sc.Score(lambda r, im: im.scores["kl"] - im.scores["recon"], "kl - recon")
    monkeypatch.setattr(sc, "REGISTRY", table)
    got = sc.score_images(ref, sc.Images(test))
    assert np.allclose(got["kl_minus_recon"], got["kl"] - got["recon"])
    # The summary over seeds picks the new score up from the table as well.
    import medvae.eval.anomaly as an

    monkeypatch.setattr(an, "REGISTRY", table)
    per_seed = [
        {
            "primary_score": "mahalanobis",
            "scores": {k: {"auroc": 0.5 + i / 10, "auprc": 0.5} for k in table},
            "sensitivity": 0.5,
            "specificity": 0.9,
            "val_fpr": 0.05,
            "test_fpr": {"value": 0.1, "target": 0.05},
            "fidelity": {"ssim": 0.5, "psnr": 20.0},
        }
        for i in range(2)
    ]
    summary = summarise_anomaly(per_seed)
    assert summary["scores"]["kl_minus_recon"]["auroc"]["mean"] == pytest.approx(0.55)


def test_combined_zscore() -> None:
    ref = {"a": np.array([0.0, 2.0]), "b": np.array([10.0, 30.0])}
    z = sc.combined_zscore({"a": np.array([1.0, 3.0]), "b": np.array([20.0, 40.0])}, ref, ["a", "b"])
    assert np.allclose(z, [0.0, 4.0])  # (x - mean) / sd per score, summed
