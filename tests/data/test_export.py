from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medvae.data.dataset import StoreDataset
from medvae.data.export import export, safe_name
from medvae.data.store import Store, empty_rows, lineage, to_arrow


def _store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    buf = empty_rows()
    rng = np.random.default_rng(0)
    for i, label in enumerate(["normal", "normal", "../../etc", None]):
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


def test_export_imagefolder_and_manifest(tmp_path: Path) -> None:
    s = _store(tmp_path)
    out = tmp_path / "export"
    manifest = export(s, out)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["id"] for r in rows] == ["id0", "id1", "id2", "id3"] or len(rows) == 4
    by_id = {r["id"]: r for r in rows}
    assert by_id["id0"]["path"] == "normal/id0.png" and by_id["id0"]["anomaly_score"] == "0"
    assert by_id["id3"]["path"].startswith("unlabelled/") and by_id["id3"]["anomaly_score"] == ""
    # A hostile label cannot escape the export folder.
    assert ".." not in by_id["id2"]["path"] and (out / by_id["id2"]["path"]).resolve().is_relative_to(
        out.resolve()
    )
    img = np.asarray(Image.open(out / by_id["id1"]["path"]))
    table = s.read(where={"label": "normal"})
    want = dict(zip(table.column("id").to_pylist(), table.column("pixels").to_pylist(), strict=True))
    assert img.tobytes() == want["id1"]  # lossless round trip


def test_safe_name() -> None:
    assert safe_name("../../x", "f") == "x"
    assert safe_name("..", "f") == "f"
    assert safe_name("a b/c", "f") == "a_b_c"


def test_dataset_reads_any_version(tmp_path: Path) -> None:
    s = _store(tmp_path)
    extra = empty_rows()
    extra.update(
        id=["syn"], height=[64], width=[64], pixels=[bytes(4096)], origin=["synthetic"], label=["normal"]
    )
    s.insert_new(to_arrow(extra), lineage("augment", {}))
    ds0 = StoreDataset(str(tmp_path / "store"), version=0)
    ds1 = StoreDataset(str(tmp_path / "store"))
    assert len(ds0) == 4 and len(ds1) == 5 and ds1.version == 1
    x, y = ds1[0]
    assert y in (-1, 0, 1)
    assert tuple(x.shape) == (1, 64, 64) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    syn = StoreDataset(str(tmp_path / "store"), where={"origin": "synthetic"})
    assert len(syn) == 1 and syn.label_names == ["normal"] and syn[0][1] == 0
