"""Tests for the held-out evaluation: patient-grouped splits, metrics and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvae.config import EvaluateConfig, IngestConfig, ModelConfig, ShiftSplitConfig, TrainConfig
from medvae.data.splits import check_no_leak, grouped_subsample, merge_duplicate_groups, patient_split
from medvae.eval.data import list_image_folder, load_dataset
from medvae.eval.study import evaluate


def _groups(n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups: list[str] = []
    labels: list[str] = []
    for p in range(n_patients):
        k = int(rng.integers(1, 6))  # 1..5 images per patient
        groups += [f"person{p}"] * k
        labels += ["pneumonia" if p % 3 else "normal"] * k
    return np.array(groups), np.array(labels)


def test_patient_split_never_leaks_and_is_deterministic() -> None:
    groups, labels = _groups(300)
    a = patient_split(groups, labels, (0.7, 0.1, 0.2), seed=0)
    check_no_leak(groups, a)
    for g in set(groups.tolist()):
        assert len(set(a[groups == g].tolist())) == 1
    # Deterministic, and independent of the row order.
    perm = np.random.default_rng(1).permutation(len(groups))
    b = patient_split(groups[perm], labels[perm], (0.7, 0.1, 0.2), seed=0)
    assert np.array_equal(a[perm], b)
    assert np.array_equal(a, patient_split(groups, labels, (0.7, 0.1, 0.2), seed=0))
    # Another seed gives another split; every class is in every split at about the requested share.
    assert not np.array_equal(a, patient_split(groups, labels, (0.7, 0.1, 0.2), seed=1))
    for lbl in ("normal", "pneumonia"):
        m = labels == lbl
        for s, f in zip(("train", "val", "test"), (0.7, 0.1, 0.2), strict=True):
            assert abs(float((a[m] == s).mean()) - f) < 0.06


def test_check_no_leak_raises_on_a_crossing_patient() -> None:
    with pytest.raises(AssertionError, match="person1"):
        check_no_leak(np.array(["person1", "person2", "person1"]), np.array(["train", "val", "test"]))


def test_grouped_subsample_keeps_whole_patients_and_classes() -> None:
    groups, labels = _groups(300)
    m = grouped_subsample(groups, labels, 0.1, seed=0)
    for g in set(groups.tolist()):
        assert len(set(m[groups == g].tolist())) == 1
    for lbl in ("normal", "pneumonia"):
        share = m[labels == lbl].mean()
        assert 0.08 < share < 0.16
    assert np.array_equal(m, grouped_subsample(groups, labels, 0.1, seed=0))
    assert grouped_subsample(groups, labels, 1.0).all()


def test_duplicate_images_join_their_patients() -> None:
    imgs = np.zeros((4, 8, 8), np.uint8)
    imgs[1] = 1
    imgs[3] = 1  # a copy of image 1 under another patient
    groups = merge_duplicate_groups(imgs, np.array(["a", "b", "c", "d"]))
    assert groups[1] == groups[3] == "b"
    assert groups[0] == groups[2] == "a"  # images 0 and 2 are identical too (all zeros)
    assert len(set(groups.tolist())) == 2


def _tiny_folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for label in ("normal", "abnormal"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            if label == "normal":
                base = 0.5 + 0.3 * np.sin(xx / 5.0 + i)
            else:
                base = 0.3 + 0.5 * (((xx // 8) + (yy // 8)) % 2)
            img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
            # Two images per patient, named like Kermany's normals (IM-0001-0001.png, IM-0001-0002.png).
            name = f"IM-{i // 2 + (0 if label == 'normal' else 500):04d}-{i % 2 + 1:04d}.png"
            Image.fromarray((img * 255).astype(np.uint8)).save(root / label / name)
    return root


def test_list_image_folder_labels_by_parent(tmp_path: Path) -> None:
    for sub in ("train/0_normal", "test/1_abnormal"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "00000005_000.png").write_bytes(b"x")
    (tmp_path / "stray.png").write_bytes(b"x")
    found = list_image_folder(tmp_path)
    assert [lbl for _, lbl in found] == ["1_abnormal", "0_normal"]


def _tiny_train() -> TrainConfig:
    # min_steps=0: one epoch, not the generator's default step floor.
    model = ModelConfig(channels=(8, 16), latent_dim=4)
    return TrainConfig(model=model, epochs=1, batch_size=16, patience=1, min_steps=0, device="cpu")


def test_evaluate_end_to_end_on_a_tiny_folder(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "data")
    tiny = _tiny_train()
    cfg = EvaluateConfig(
        seeds=(0,),
        anomaly=tiny,
        generator=tiny.model_copy(
            update={"model": ModelConfig(channels=(8, 16), latent_dim=4, conditional=True, num_classes=2)}
        ),
        classifier_epochs=1,
        label_fractions=(0.5,),
        pictures=4,
        device="cpu",
        workers=1,
        # tests/eval/test_cohort.py covers the shift-aware split and the localisation check.
        shift=ShiftSplitConfig(enabled=False),
        localisation_images=0,
    )
    out = tmp_path / "out"
    m = evaluate(root, out, normal_label="normal", cfg=cfg, progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["anomaly"]["summary"]["primary_score"] == "lowpass_error"
    for key in ("data", "anomaly", "utility", "privacy", "targets", "timing", "config"):
        assert key in on_disk
    scores = on_disk["anomaly"]["summary"]["scores"]
    for name in ("lowpass_error", "mahalanobis", "kl", "recon", "elbo"):
        assert 0.0 <= scores[name]["auroc"]["mean"] <= 1.0
        assert 0.0 <= scores[name]["auprc"]["mean"] <= 1.0
    for key in ("sensitivity", "specificity", "ssim", "psnr"):
        assert on_disk["anomaly"]["summary"][key]["mean"] is not None
    u = on_disk["utility"]["summary"]["0.5"]
    assert set(u) == {
        "real",
        "real_synthetic",
        "synthetic",
        "real_repeated",
        "tstr_ratio",
        "real_synthetic_minus_real",
        "real_synthetic_minus_real_repeated",
        "generation",
    }
    # The steps control has exactly as many images as real + synthetic; 50 % is above the share sweep.
    sizes = on_disk["utility"]["per_seed"][0]["fractions"]["0.5"]["sizes"]
    assert sizes["real_repeated"] == sizes["real_synthetic"] == sizes["real"] + sizes["synthetic"]
    p = on_disk["privacy"]["summary"]["0.5"]
    assert p["near_copy_share_after"]["mean"] == 0.0
    splits = on_disk["data"]["splits"]
    assert sum(s["images"] for s in splits.values()) == 48
    assert on_disk["data"]["patients_crossing_splits"] == 0
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and "AUROC" in report
    assert (out / "pictures" / "roc.png").exists()
    assert m["anomaly"]["summary"]["primary_score"] == "lowpass_error"


def test_load_dataset_caches_decoded_folders(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "data", n=4)
    kw = {"store_version": None, "ingest_cfg": IngestConfig(), "workers": 1, "cache_dir": tmp_path / "cache"}
    a, info_a = load_dataset(root, **kw)
    b, info_b = load_dataset(root, **kw)
    assert (info_a["cached"], info_b["cached"]) == (False, True)
    assert np.array_equal(a.images, b.images) and a.images.shape == (8, 64, 64)
    assert sorted(set(a.labels.tolist())) == ["abnormal", "normal"]
    assert a.groups.tolist() == b.groups.tolist()
    assert a.groups[0] == a.groups[1]  # IM-0500-0001 and IM-0500-0002 are one patient


def test_evaluate_rejects_an_unknown_normal_label(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "data", n=4)
    with pytest.raises(ValueError, match="normal label"):
        evaluate(
            root, tmp_path / "out", normal_label="healthy", cfg=EvaluateConfig(workers=1), progress=False
        )


def test_evaluate_reads_a_store_version(tmp_path: Path) -> None:
    from medvae.data.ingest import ingest
    from medvae.data.store import Store

    root = _tiny_folder(tmp_path / "data", n=12)
    store = Store(str(tmp_path / "store"))
    ingest([root], store, IngestConfig(workers=1))
    tiny = _tiny_train()
    cfg = EvaluateConfig(seeds=(0,), anomaly=tiny, utility=False, pictures=4, device="cpu")
    m = evaluate(store.uri, tmp_path / "out", normal_label="normal", cfg=cfg, store_version=0, progress=False)
    assert m["source_info"]["kind"] == "store" and m["source_info"]["version"] == 0
    assert m["data"]["n_images"] == 24
    # The store holds keyed patient hashes: IM-0000-0001 and IM-0000-0002 still share a split.
    assert m["data"]["patients_crossing_splits"] == 0
    assert sum(s["patients"] for s in m["data"]["splits"].values()) == 12
    # The store's images were standardised at ingest (the default): never standardise them twice.
    assert m["intensity"] == {"at_ingest": "clahe", "applied_here": "none"}
    assert "utility" not in m
    # A store keeps no file names, so no acquisition batch: said, not silently skipped.
    assert "shift" not in m and "store keeps no file names" in m["shift_unavailable"]
    raw = Store(str(tmp_path / "raw"))
    ingest([root], raw, IngestConfig(workers=1, intensity="none"))
    m2 = evaluate(raw.uri, tmp_path / "out2", normal_label="normal", cfg=cfg, progress=False)
    assert m2["intensity"] == {"at_ingest": "none", "applied_here": "clahe"}


def test_cli_evaluate_writes_metrics_and_prints_the_headline(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medvae.cli import app

    root = _tiny_folder(tmp_path / "data", n=12)
    out = tmp_path / "eval"
    tiny = [
        "anomaly.model.channels=[8,16]",
        "anomaly.model.latent_dim=4",
        "anomaly.epochs=1",
        "workers=1",
        "pictures=4",
    ]
    args = ["evaluate", str(root), "--out", str(out), "--seeds", "0,1", "--split-seed", "3"]
    args += ["--split", "0.6,0.2,0.2", "--no-utility", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, *(x for kv in tiny for x in ("--set", kv))])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["seeds"] == [0, 1] and m["config"]["split_seed"] == 3
    assert m["config"]["split_fractions"] == [0.6, 0.2, 0.2]
    assert "utility" not in m and m["anomaly"]["summary"]["scores"]["mahalanobis"]["auroc"]["n"] == 2
    assert "mahalanobis" in res.output and "report.html" in res.output
    # A bad normal label is a one-line error, not a traceback.
    bad = CliRunner().invoke(app, ["evaluate", str(root), "--out", str(out), "--normal-label", "healthy"])
    assert bad.exit_code == 1 and "normal label" in bad.output and "Traceback" not in bad.output


def test_evaluate_refuses_a_model_directory(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "data", n=4)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model directory"):
        evaluate(root, model_dir, normal_label="normal", cfg=EvaluateConfig(workers=1), progress=False)
    assert not (model_dir / "pictures").exists() and not (model_dir / "cache").exists()


def test_undecodable_files_are_reported_not_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medvae.eval.data import report_rejected

    root = _tiny_folder(tmp_path / "data", n=2)
    (root / "normal" / "broken.png").write_bytes(b"not a png")
    data, info = load_dataset(root, store_version=None, ingest_cfg=IngestConfig(), workers=1, cache_dir=None)
    assert len(data.images) == 4
    (name, reason), *rest = info["rejected"]
    assert name == "normal/broken.png" and reason and not rest
    report_rejected(info["rejected"])
    assert "normal/broken.png" in capsys.readouterr().err
