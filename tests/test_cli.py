from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
