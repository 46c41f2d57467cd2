"""The CLI: stage commands end to end, and every expected failure as one actionable line (exit code 1)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from medvae.cli import app

runner = CliRunner()


def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("normal", "abnormal"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "normal" / "bad.png").write_bytes(b"garbage")
    return root


def test_ingest_versions_export(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    store = tmp_path / "store"
    res = runner.invoke(
        app, ["ingest", str(src), "--store", str(store), "--report", str(tmp_path / "r.json")]
    )
    assert res.exit_code == 0, res.output
    assert "ingested 6, rejected 1, skipped 0" in res.output
    assert "bad.png" in res.output  # the rejected file is named, with its reason
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"] == {"seen": 7, "ingested": 6, "rejected": 1, "skipped": 0}

    res = runner.invoke(app, ["ingest", str(src), "--store", str(store)])
    assert res.exit_code == 0 and "ingested 0, rejected 1, skipped 6" in res.output

    res = runner.invoke(app, ["versions", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    versions = json.loads(res.output)
    assert [(v["version"], v["rows"], v["operation"]) for v in versions] == [(0, 6, "ingest")]

    res = runner.invoke(
        app, ["export", "--store", str(store), "--out", str(tmp_path / "exp"), "--version", "0"]
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "exp").rglob("*.png"))) == 6
    assert (tmp_path / "exp" / "manifest.csv").read_text().count("\n") == 7


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    res = runner.invoke(app, ["versions", "--store", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert "error:" in res.output and "medvae ingest" in res.output and "Traceback" not in res.output

    src = _tree(tmp_path / "src")
    res = runner.invoke(app, ["ingest", str(src), "--store", str(tmp_path / "s"), "--set", "size=7"])
    assert res.exit_code == 1 and "invalid config: size" in res.output

    store = tmp_path / "s2"
    assert runner.invoke(app, ["ingest", str(src), "--store", str(store)]).exit_code == 0
    res = runner.invoke(
        app, ["export", "--store", str(store), "--out", str(tmp_path / "e"), "--version", "9"]
    )
    assert res.exit_code == 1 and "version 9 does not exist" in res.output


def test_nothing_ingestable_exits_nonzero(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    res = runner.invoke(app, ["ingest", str(src), "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "ingested 0, rejected 1, skipped 0" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["ingest", str(empty), "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "no files found" in res.output


# ------------------------------------------------------------------------------- clear errors
def _one_line_error(res: Result) -> str:
    """The failure is exit code 1 and exactly one ``error:`` line, with no traceback."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_one_line_check_can_fail() -> None:
    """The checker above rejects a traceback, a second line and a zero exit code."""
    ok = runner.invoke(app, ["versions", "--help"])
    with pytest.raises(AssertionError):
        _one_line_error(ok)
    tb = runner.invoke(app, ["--debug", "versions", "--store", "/nonexistent/medvae-store"])
    with pytest.raises(AssertionError):
        _one_line_error(tb)


@pytest.mark.parametrize(
    ("yaml_text", "expect"),
    [
        ("nosuch_key: 1\n", "invalid config: nosuch_key"),
        ("size: 7\n", "invalid config: size"),
        ("aspect: sideways\n", "invalid config: aspect"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("size: [64\n", "is not valid YAML"),
        (None, "config file"),  # no file at all
    ],
)
def test_bad_config_is_one_line(yaml_text: str | None, expect: str, tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.yaml"
    if yaml_text is not None:
        cfg.write_text(yaml_text, encoding="utf-8")
    src = tmp_path / "src"
    src.mkdir()
    res = runner.invoke(app, ["ingest", str(src), "--store", str(tmp_path / "s"), "--config", str(cfg)])
    msg = _one_line_error(res)
    assert expect in msg
    assert not (tmp_path / "s").exists()


def test_bad_override_is_one_line(tmp_path: Path) -> None:
    # "[64" is not YAML, so it is the string "[64", which the size field refuses, naming the key.
    for override, expect in (("size", "key=value"), ("size=[64", "size: Input"), ("a.b=1", "invalid config")):
        res = runner.invoke(app, ["ingest", str(tmp_path), "--store", str(tmp_path / "s"), "--set", override])
        assert expect in _one_line_error(res)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("size: [64\n", encoding="utf-8")
    res = runner.invoke(
        app, ["--debug", "ingest", str(tmp_path), "--store", str(tmp_path / "s"), "-c", str(cfg)]
    )
    assert res.exit_code == 1 and "Traceback" in res.output and "is not valid YAML" in res.output


def test_missing_store_and_version_are_one_line(tmp_path: Path) -> None:
    for cmd in (
        ["versions"],
        ["export", "--out", str(tmp_path / "e")],
        ["train", "--out", str(tmp_path / "m")],
    ):
        msg = _one_line_error(runner.invoke(app, [*cmd, "--store", str(tmp_path / "nope")]))
        assert "medvae ingest" in msg  # says what to do
    store = tmp_path / "store"
    assert runner.invoke(app, ["ingest", str(_tree(tmp_path / "src")), "--store", str(store)]).exit_code == 0
    res = runner.invoke(
        app, ["export", "--store", str(store), "--out", str(tmp_path / "e"), "--version", "3"]
    )
    msg = _one_line_error(res)
    assert "version 3 does not exist" in msg and "0..0" in msg


def test_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store = tmp_path / "store"
    assert runner.invoke(app, ["ingest", str(_tree(tmp_path / "src")), "--store", str(store)]).exit_code == 0
    res = runner.invoke(
        app,
        ["train", "--store", str(store), "--out", str(tmp_path / "m"), "--device", "cuda", "--epochs", "1"],
    )
    msg = _one_line_error(res)
    assert "no GPU" in msg and "--device cpu" in msg and "auto" in msg
    assert not (tmp_path / "m" / "weights.safetensors").exists()


def test_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    assert runner.invoke(app, ["ingest", str(_tree(tmp_path / "src")), "--store", str(store)]).exit_code == 0

    def full(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    res = runner.invoke(app, ["export", "--store", str(store), "--out", str(tmp_path / "e")])
    msg = _one_line_error(res)
    # The export is staged beside its destination (.e.export-*) and swapped in whole: that is the path.
    assert "disk is full" in msg and "free some disk space" in msg and str(tmp_path / ".e.export-") in msg


def test_missing_model_directory_is_one_line(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    nomodel = tmp_path / "nomodel"
    for args in (
        ["screen", str(src), "--model", str(nomodel)],
        ["augment", "--model", str(nomodel), "--store", str(tmp_path / "s")],
    ):
        msg = _one_line_error(runner.invoke(app, args))
        assert f"{nomodel} is not a directory" in msg and "medvae train" in msg
    nomodel.mkdir()
    msg = _one_line_error(runner.invoke(app, ["screen", str(src), "--model", str(nomodel)]))
    assert "medvae train" in msg
