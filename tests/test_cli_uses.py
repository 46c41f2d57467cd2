"""The three uses through the real CLI: the seams between stages (issue 10).

Each test drives `medvae` as an operator would and checks what the operator sees and gets: literal
output for untrusted text, one-line errors, heat maps that map back to their inputs, repeated augments
that add what they say, and help that matches the code.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from flows.cli import app
from medvae.data.store import Store
from tests.test_cli import _one_line_error

runner = CliRunner()
# min_steps=0: the one epoch these tests ask for, not a generator's default step floor.
TINY = ["--set", "model.channels=[8,16]", "--set", "model.latent_dim=4", "--set", "batch_size=8"]
TINY += ["--set", "min_steps=0"]


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:72, 0:72]
    img = 100 + 40 * np.sin(xx / (3.0 + seed % 4)) + rng.normal(0, 8, xx.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def _dicom(path: Path, photometric: str = "MONOCHROME2", view: str = "AP") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BurnedInAnnotation = "DX", view, "NO"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A store of 24 normal PNGs and a tiny model trained on them: (source folder, store, model)."""
    root = tmp_path_factory.mktemp("uses")
    src = root / "src"
    for i in range(24):
        _png(src / "normal" / f"IM-{i:04d}-0001.png", i)
    store, model = root / "store", root / "model"
    assert runner.invoke(app, ["ingest", str(src), "--store", str(store), "--workers", "1"]).exit_code == 0
    res = runner.invoke(app, ["train", "--store", str(store), "--out", str(model), "--epochs", "1", *TINY])
    assert res.exit_code == 0, res.output
    return src, store, model


# ------------------------------------------------------------------------- untrusted text is literal
def test_markup_and_escapes_in_file_names_print_literally(
    tmp_path: Path, trained: tuple[Path, Path, Path]
) -> None:
    src = tmp_path / "src"
    odd = ["[/b]scan.png", "AP [portable].png", "evil\x1b[31mred.png", "[bold]x[/bold].png"]
    for i, name in enumerate(odd):
        _png(src / "normal" / name, 100 + i)
    (src / "normal" / "[/]broken.png").write_bytes(b"not an image")
    res = runner.invoke(app, ["ingest", str(src), "--store", str(tmp_path / "store"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "ingested 4, rejected 1, skipped 0" in res.output  # the summary prints after the commit
    assert "[/]broken.png" in res.output and "\x1b" not in res.output
    _, _, model = trained
    res = runner.invoke(app, ["screen", str(src), "--model", str(model)])
    assert res.exit_code == 0, res.output
    for name in ("[/b]scan.png", "AP [portable].png", "[bold]x[/bold].png", "evil\\x1b[31mred.png"):
        assert name in res.output, name
    assert "\x1b" not in res.output


def test_a_dicom_value_with_markup_is_printed_literally(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _dicom(src / "a.dcm", photometric="[/]")
    _dicom(src / "b.dcm", view="AP [portable]")
    res = runner.invoke(app, ["ingest", str(src), "--store", str(tmp_path / "s"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "ingested 1, rejected 1" in res.output and "MarkupError" not in res.output


# ------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_store_that_is_not_a_store_is_one_line_for_every_command(
    tmp_path: Path, kind: str, trained: tuple[Path, Path, Path]
) -> None:
    bad = tmp_path / "notastore"
    if kind == "file":
        bad.write_text("hello")
    else:
        (bad / "stuff").mkdir(parents=True)
        (bad / "stuff" / "x.txt").write_text("hello")
    src = tmp_path / "src"
    _png(src / "normal" / "IM-0001-0001.png", 1)
    for cmd in (
        ["versions", "--store", str(bad)],
        ["export", "--store", str(bad), "--out", str(tmp_path / "e")],
        ["train", "--store", str(bad), "--out", str(tmp_path / "m")],
        ["augment", "--model", str(trained[2]), "--store", str(bad)],
    ):
        msg = _one_line_error(runner.invoke(app, cmd))
        assert str(bad) in msg, (cmd, msg)


def test_screening_a_folder_without_images_says_why(tmp_path: Path, trained: tuple[Path, Path, Path]) -> None:
    _, _, model = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["screen", str(empty), "--model", str(model)])
    assert res.exit_code == 1 and "error: no files found in" in res.output and str(empty) in res.output
    (empty / "notes.txt").write_text("not a scan")
    res = runner.invoke(app, ["screen", str(empty), "--model", str(model)])
    assert res.exit_code == 1 and "none of the 1 files could be scored" in res.output


def test_a_hostile_checkpoint_on_resume_is_one_line(tmp_path: Path, trained: tuple[Path, Path, Path]) -> None:
    _, store, _ = trained
    out = tmp_path / "model"
    (out / "checkpoint").mkdir(parents=True)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"format": "medvae-train-checkpoint", "x": Evil()}, out / "checkpoint" / "checkpoint.pt")
    res = runner.invoke(
        app, ["train", "--store", str(store), "--out", str(out), "--resume", "--epochs", "1", *TINY]
    )
    msg = _one_line_error(res)
    assert "checkpoint" in msg and "pwned" not in res.output


# ------------------------------------------------------------------------- outputs map back to inputs
def test_heat_maps_are_named_by_row_and_the_csv_maps_files_to_them(
    tmp_path: Path, trained: tuple[Path, Path, Path]
) -> None:
    src, _, model = trained
    out, heat = tmp_path / "scores.csv", tmp_path / "heat"
    res = runner.invoke(
        app, ["screen", str(src), "--model", str(model), "--out", str(out), "--heatmaps", str(heat)]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and all(r["status"] == "scored" for r in rows)
    assert sorted(r["heatmap"] for r in rows) == sorted(p.name for p in heat.iterdir())
    assert not any(p.name.startswith("scan_0") for p in heat.iterdir())
    # The same file always gets the same heat-map name; two different files never share one.
    assert len({r["heatmap"] for r in rows}) == len(rows)
    again = tmp_path / "again.csv"
    assert runner.invoke(app, ["screen", str(src), "--model", str(model), "--out", str(again)]).exit_code == 0
    first = {r["file"]: r["heatmap"] for r in rows}
    assert first == {r["file"]: r["heatmap"] for r in csv.DictReader(again.open())}


def test_a_threshold_from_few_normals_comes_with_its_uncertainty(trained: tuple[Path, Path, Path]) -> None:
    _, store, _ = trained
    out = Path(store).parent / "few"
    res = runner.invoke(app, ["train", "--store", str(store), "--out", str(out), "--epochs", "1", *TINY])
    assert res.exit_code == 0, res.output
    assert "warning: the anomaly threshold was calibrated on only" in res.output
    assert "95 % interval" in res.output


# ------------------------------------------------------------------------- synthetic rows are accounted for
def test_two_augment_labels_with_the_default_seed_add_both_in_full(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(16):
        _png(src / "normal" / f"IM-{i:04d}-0001.png", i)
        _png(src / "pneumonia" / f"person{i}_virus_{i}.png", 50 + i)
    store, model = str(tmp_path / "store"), str(tmp_path / "model")
    assert runner.invoke(app, ["ingest", str(src), "--store", store, "--workers", "1"]).exit_code == 0
    res = runner.invoke(
        app, ["train", "--store", store, "--out", model, "--conditional", "--epochs", "1", *TINY]
    )
    assert res.exit_code == 0, res.output
    for label in ("pneumonia", "normal"):
        res = runner.invoke(
            app,
            [
                "augment",
                "--model",
                model,
                "--store",
                store,
                "--count",
                "12",
                "--label",
                label,
                "--set",
                "privacy_quantile=0.0",
            ],
        )
        assert res.exit_code == 0, res.output
        assert "no new version" not in res.output
    syn = Store(store).read(where={"origin": "synthetic"})
    labels = syn.column("label").to_pylist()
    kept = [int(line.split()[1]) for line in res.output.splitlines() if line.startswith("kept")]
    assert labels.count("normal") == kept[-1] and labels.count("pneumonia") >= 1
    assert len(set(syn.column("id").to_pylist())) == syn.num_rows
    # The same call again adds nothing and says so, rather than silently dropping or duplicating.
    res = runner.invoke(
        app,
        [
            "augment",
            "--model",
            model,
            "--store",
            store,
            "--count",
            "12",
            "--label",
            "normal",
            "--set",
            "privacy_quantile=0.0",
        ],
    )
    assert res.exit_code == 0 and "added 0 rows" in res.output and "already in the store" in res.output
    assert Store(store).read(where={"origin": "synthetic"}).num_rows == syn.num_rows


def test_an_unconditional_model_refuses_a_label_it_was_not_trained_on(
    trained: tuple[Path, Path, Path],
) -> None:
    _, store, model = trained
    msg = _one_line_error(
        runner.invoke(app, ["augment", "--model", str(model), "--store", str(store), "--label", "pneumonia"])
    )
    assert "'pneumonia'" in msg and "--conditional" in msg


def test_pictures_are_drawn_per_label(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(12):
        _png(src / "normal" / f"IM-{i:04d}-0001.png", i)
        _png(src / "pneumonia" / f"person{i}_virus_{i}.png", 50 + i)
    store, model = str(tmp_path / "store"), str(tmp_path / "model")
    assert runner.invoke(app, ["ingest", str(src), "--store", store, "--workers", "1"]).exit_code == 0
    assert (
        runner.invoke(
            app, ["train", "--store", store, "--out", model, "--conditional", "--epochs", "1", *TINY]
        ).exit_code
        == 0
    )
    pics = {}
    for label in ("normal", "pneumonia"):
        out = tmp_path / f"pics_{label}"
        res = runner.invoke(
            app,
            [
                "augment",
                "--model",
                model,
                "--store",
                store,
                "--count",
                "0",
                "--label",
                label,
                "--pictures",
                str(out),
            ],
        )
        assert res.exit_code == 0, res.output
        (png,) = list(out.iterdir())
        assert label in png.name
        pics[label] = png.read_bytes()
    assert pics["normal"] != pics["pneumonia"]


# ------------------------------------------------------------------------- help matches the code
def test_help_has_text_for_every_option_and_no_markup() -> None:
    for cmd in (
        "ingest",
        "versions",
        "export",
        "train",
        "augment",
        "screen",
        "evaluate",
        "run",
        "serve",
        "config",
    ):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "<bool>" not in res.output and "``" not in res.output and ":func:" not in res.output, cmd
    for cmd, opts in (("train", ("--epochs", "--seed")), ("augment", ("--seed",)), ("serve", ("--name",))):
        text = runner.invoke(app, [cmd, "--help"]).output
        for opt in opts:
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(opt))
            assert len(line.split()) > 2, (cmd, line)  # a help text follows the option


def test_every_command_the_readme_says_takes_config_and_set_does() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "take `--config FILE.yaml`" in ln)
    for cmd in ("ingest", "train", "augment", "screen", "evaluate", "run", "serve"):
        assert f"`{cmd}`" in line, cmd
        text = runner.invoke(app, [cmd, "--help"]).output
        assert "--config" in text and "--set" in text, cmd


def test_medvae_run_needs_no_prefect_server(tmp_path: Path, sample_dir: Path) -> None:
    import shutil

    src = tmp_path / "src" / "normal"
    src.mkdir(parents=True)
    for f in sorted((sample_dir / "normal").iterdir())[:20]:
        shutil.copy(f, src / f.name)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"sources: [{src.parent}]\nstore: {tmp_path / 'store'}\nmodel_dir: {tmp_path / 'model'}\n"
        "train_where: {label: normal}\ningest: {workers: 1}\naugment: {count: 4}\n"
        "train: {model: {channels: [8, 16], latent_dim: 4}, epochs: 1, batch_size: 8, device: cpu}\n"
    )
    code = "import sys, flows.cli as c; c.app(['run', '--config', sys.argv[1]], standalone_mode=False)"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys as s; assert 'prefect' not in s.modules", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pipeline: wrote version 1" in out.stderr and "temporary server" not in out.stderr + out.stdout


def test_recalibration_on_local_normals_sets_the_promised_rate_there(
    tmp_path: Path, trained: tuple[Path, Path, Path]
) -> None:
    import shutil

    _, _, model0 = trained
    model = tmp_path / "model"
    shutil.copytree(model0, model)
    local = tmp_path / "local"
    for i in range(60):  # a "site" whose normals look brighter than the training cohort's
        img = np.asarray(Image.open(_png(tmp_path / "tmp" / f"{i}.png", 300 + i)), dtype=np.int32) + 40
        local.mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(local / f"IM-{900 + i}-0001.png")
    before = (model / "hash.txt").read_text().split()[0]
    first = runner.invoke(
        app, ["screen", str(local), "--model", str(model), "--out", str(tmp_path / "0.csv")]
    )
    assert first.exit_code == 0 and "set on normals of the training cohort" in first.output
    res = runner.invoke(app, ["recalibrate", str(local), "--model", str(model), "--fpr", "0.1"])
    assert res.exit_code == 0, res.output
    assert "recalibrated on 60 normal scans" in res.output and "95 % interval" in res.output
    # The share the old calibration flagged is the first screen's (threshold or latent guard), same scans.
    first_flags = sum(int(r["flag"]) for r in csv.DictReader((tmp_path / "0.csv").open()))
    assert f"the old calibration flagged {first_flags / 60:.1%} of them" in res.output
    assert ("unlike the training cohort" in res.output) is (first_flags >= 30)
    assert (model / "hash.txt").read_text().split()[0] != before
    out = tmp_path / "s.csv"
    after = runner.invoke(app, ["screen", str(local), "--model", str(model), "--out", str(out)])
    assert after.exit_code == 0 and "training cohort" not in after.output  # now set on this site's normals
    flags = [int(r["flag"]) for r in csv.DictReader(out.open())]
    assert len(flags) == 60 and sum(flags) <= 6  # at most 10 % of the calibration normals lie above
    assert _one_line_error(
        runner.invoke(app, ["recalibrate", str(tmp_path / "tmp" / "0.png"), "--model", str(model)])
    )


def test_the_readme_command_table_lists_every_command() -> None:
    import typer.main

    from flows.cli import app as full_app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = [ln for ln in readme.splitlines() if ln.startswith("| `medvae ")]
    listed = {ln.split("`medvae ", 1)[1].split()[0].rstrip("`") for ln in table}
    commands = set(typer.main.get_command(full_app).commands)  # type: ignore[attr-defined]
    assert commands == listed, (commands - listed, listed - commands)
