"""Walking sources (medvae.data.walk): symlinks that leave the tree, and labels CSVs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medvae.data.walk import iter_files, read_labels_csv


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    (src / "normal" / "a.png").write_bytes(b"a")
    secret = tmp_path / "outside" / "store.key"
    secret.parent.mkdir()
    secret.write_text("00112233445566778899")
    return src, secret


def test_file_symlink_leaving_the_source_is_rejected_not_followed(tmp_path: Path) -> None:
    src, secret = _tree(tmp_path)
    (src / "normal" / "leak.dcm").symlink_to(secret)
    (src / "normal" / "passwd.dcm").symlink_to("/etc/passwd")
    # A chain of links that ends outside: the first hop stays inside the tree.
    (src / "hop").symlink_to(secret)
    (src / "normal" / "chain.dcm").symlink_to(src / "hop")
    walked = dict(iter_files([src]))
    for name in ("leak.dcm", "passwd.dcm", "chain.dcm"):
        reason = walked[src / "normal" / name]
        assert reason is not None and reason.startswith("symlink to a file outside the source folder")
        assert "0011" not in reason and "root" not in reason
    assert walked[src / "normal" / "a.png"] is None


def test_symlinks_inside_the_source_and_named_sources_are_followed(tmp_path: Path) -> None:
    src, secret = _tree(tmp_path)
    (src / "normal" / "alias.png").symlink_to(src / "normal" / "a.png")
    walked = dict(iter_files([src]))
    assert walked[src / "normal" / "alias.png"] is None
    # Given by name, a link is the operator's choice.
    named = tmp_path / "named.dcm"
    named.symlink_to(secret)
    assert dict(iter_files([named])) == {named: None}


def test_external_symlinks_can_be_allowed(tmp_path: Path) -> None:
    src, secret = _tree(tmp_path)
    (src / "normal" / "leak.dcm").symlink_to(secret)
    walked = dict(iter_files([src], follow_external_symlinks=True))
    assert walked[src / "normal" / "leak.dcm"] is None


def test_directory_symlinks_are_still_reported(tmp_path: Path) -> None:
    src, _ = _tree(tmp_path)
    (src / "loop").symlink_to(src)
    walked = dict(iter_files([src]))
    assert (walked[src / "loop"] or "").startswith("directory symlink not followed")


def test_labels_csv_with_bad_utf8_names_the_file(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"path,label\na.png,M\xfcller\n")
    with pytest.raises(ValueError) as exc:
        read_labels_csv(csv_path)
    message = str(exc.value)
    assert str(csv_path) in message and "not valid UTF-8" in message and "ller" not in message


def test_labels_csv_reads_relative_and_bare_names(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nimgs/a.png,normal\n/abs/b.png,pneumonia\n", encoding="utf-8")
    labels = read_labels_csv(csv_path)
    assert labels[os.path.normpath((tmp_path / "imgs" / "a.png").resolve())] == "normal"
    assert labels["a.png"] == "normal" and labels["b.png"] == "pneumonia"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs the columns path,label"):
        read_labels_csv(bad)
