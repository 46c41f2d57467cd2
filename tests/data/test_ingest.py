from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medvae.config import IngestConfig
from medvae.data.ingest import ingest
from medvae.data.store import Store, images_from
from medvae.data.walk import iter_files


def _png(path: Path, seed: int, mode: str = "L", size: tuple[int, int] = (80, 60)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(path)
    elif mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB").save(path)
    elif mode == "I;16":
        Image.fromarray(rng.integers(0, 4096, size[::-1], dtype=np.uint16)).save(path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(3):
        _png(root / "normal" / f"n{i}.png", i)
    _png(root / "pneumonia" / "p0.png", 10, "RGB")
    _png(root / "pneumonia" / "p1.png", 11, "I;16", (50, 120))
    (root / "pneumonia" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "notes.txt").write_text("not an image")
    (root / "empty.dcm").write_bytes(b"")
    return root


def test_ingest_accounts_for_every_file(tree: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rep = ingest([tree], store, IngestConfig(workers=1))
    c = rep.counts
    assert c == {"seen": 8, "ingested": 5, "rejected": 3, "skipped": 0}
    assert c["ingested"] + c["rejected"] + c["skipped"] == c["seen"]
    reasons = {Path(f.path).name: f.reason for f in rep.files if f.status == "rejected"}
    assert set(reasons) == {"broken.png", "notes.txt", "empty.dcm"}
    assert all(r and len(r) > 8 for r in reasons.values())
    assert "0 bytes" in reasons["empty.dcm"] or "empty" in reasons["empty.dcm"]
    assert rep.version == 0
    t = store.read()
    assert t.num_rows == 5
    assert sorted(t.column("label").to_pylist()) == ["normal"] * 3 + ["pneumonia"] * 2
    assert set(t.column("origin").to_pylist()) == {"real"}
    imgs = images_from(t)
    assert imgs.shape == (5, 64, 64) and imgs.dtype == np.uint8
    assert set(t.column("split").to_pylist()) <= {"train", "val", "test"}
    lin = store.history()[0].lineage
    assert lin["operation"] == "ingest" and lin["counts"]["seen"] == 8 and lin["config"]["size"] == 64


def test_reingest_adds_nothing_and_batch_duplicates_are_skipped(tree: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ingest([tree], store, IngestConfig(workers=1))
    again = ingest([tree], store, IngestConfig(workers=1))
    assert again.version is None and again.rows_added == 0
    assert again.counts["skipped"] == 5 and again.counts["rejected"] == 3
    assert store.version() == 0 and store.read().num_rows == 5
    # A copy of a known file under another name, plus a new file repeated twice in one batch.
    new = tmp_path / "new"
    (new / "normal").mkdir(parents=True)
    (new / "normal" / "copy.png").write_bytes((tree / "normal" / "n0.png").read_bytes())
    _png(new / "normal" / "fresh.png", 99)
    (new / "normal" / "fresh_again.png").write_bytes((new / "normal" / "fresh.png").read_bytes())
    rep = ingest([new], store, IngestConfig(workers=1))
    st = {Path(f.path).name: f.status for f in rep.files}
    assert st == {"copy.png": "skipped", "fresh.png": "ingested", "fresh_again.png": "skipped"}
    assert rep.version == 1 and store.read().num_rows == 6


def test_parallel_ingest_matches_serial(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(80):  # enough for the process pool (POOL_MIN_FILES) and several decode batches
        _png(root / ("a" if i % 2 else "b") / f"{i:03d}.png", i)
    s1, s2 = Store(tmp_path / "s1"), Store(tmp_path / "s2")
    # The same key makes ids comparable across the two stores.
    (tmp_path / "s2" / "_medvae").mkdir(parents=True)
    ingest([root], s1, IngestConfig(workers=1))
    (tmp_path / "s2" / "_medvae" / "store.key").write_bytes(
        (tmp_path / "s1" / "_medvae" / "store.key").read_bytes()
    )
    ingest([root], s2, IngestConfig(workers=2))

    def rows(s: Store) -> list[tuple[str, bytes, str]]:
        t = s.read(columns=["id", "pixels", "label"]).to_pydict()
        return sorted(zip(t["id"], t["pixels"], t["label"], strict=True))

    assert rows(s1) == rows(s2) and len(rows(s1)) == 80


def test_batched_standardisation_stores_what_one_file_alone_gives(tmp_path: Path) -> None:
    """Ingest standardises each decode batch in one call; every stored image must still be exactly what
    preparing its file alone gives (what screening a scan straight from the scanner sees)."""
    from medvae.data.prepare import prepare_file

    root = tmp_path / "src"
    paths = [_png(root / "normal" / f"{i:02d}.png", i, size=(40 + 7 * i, 50)) for i in range(20)]
    paths.append(_png(root / "normal" / "rgb.png", 50, "RGB"))
    cfg = IngestConfig(workers=1)
    store = Store(tmp_path / "store")
    ingest([root], store, cfg)
    t = store.read(columns=["id", "pixels"]).to_pydict()
    by_id = dict(zip(t["id"], t["pixels"], strict=True))
    from medvae.data.deid import keyed_hash

    key = store.key(create=False)
    for p in paths:
        stored = np.frombuffer(by_id[keyed_hash(key, "source", p.read_bytes())[:32]], np.uint8)
        np.testing.assert_array_equal(stored.reshape(64, 64), prepare_file(p, cfg), err_msg=p.name)


def test_cli_ingest_imports_neither_torch_nor_prefect(tree: Path, tmp_path: Path) -> None:
    """`medvae ingest` does no work it does not need: no torch, no Prefect, no pandas, no scikit-image,
    no scipy, and no pydicom for a folder without DICOM files (each import is ~0.3 s in every worker).
    """
    import subprocess
    import sys

    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['medvae', 'ingest', {str(tree)!r}, '--store', {str(tmp_path / 'store')!r}]\n"
        "try:\n"
        "    runpy.run_module('medvae', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'torch', 'prefect', 'pandas', 'skimage', 'monai', 'torchvision', 'pydicom', 'scipy'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert Store(tmp_path / "store").version() == 0  # the ingest did run


def test_labels_from_csv_and_none(tmp_path: Path) -> None:
    root = tmp_path / "DOE_JOHN"
    _png(root / "a.png", 1)
    _png(root / "b.png", 2)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerow(["DOE_JOHN/a.png", "effusion"])
        w.writerow(["b.png", "normal"])
    s = Store(tmp_path / "store")
    ingest([root], s, IngestConfig(workers=1, labels_csv=labels))
    got = sorted(s.read(columns=["label"]).column("label").to_pylist())
    assert got == ["effusion", "normal"]
    s2 = Store(tmp_path / "store2")
    ingest([root], s2, IngestConfig(workers=1, labels="none"))
    assert s2.read(columns=["label"]).column("label").to_pylist() == [None, None]


def test_no_source_paths_in_store(tmp_path: Path) -> None:
    root = tmp_path / "Patient_SMITH_JANE_MRN999" / "normal"
    _png(root / "smith_jane_scan.png", 5)
    s = Store(tmp_path / "store")
    rep = ingest([root.parent], s, IngestConfig(workers=1))
    assert rep.counts["ingested"] == 1
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for needle in (b"SMITH", b"smith_jane", b"MRN999"):
                assert needle not in data, f"{needle!r} leaked into {f}"


def test_walk_handles_symlink_loops_and_missing(tmp_path: Path) -> None:
    root = tmp_path / "src"
    _png(root / "x" / "a.png", 1)
    (root / "x" / "loop").symlink_to(root, target_is_directory=True)
    walked = list(iter_files([root, tmp_path / "missing"]))
    names = {p.name: err for p, err in walked}
    assert names["a.png"] is None
    assert "symlink" in (names["loop"] or "")
    assert names["missing"] == "does not exist"


def test_report_json(tree: Path, tmp_path: Path) -> None:
    rep = ingest([tree], Store(tmp_path / "store"), IngestConfig(workers=1))
    out = tmp_path / "r" / "report.json"
    rep.write(out)
    data = json.loads(out.read_text())
    assert data["counts"]["seen"] == len(data["files"]) == 8
    assert all(f["reason"] for f in data["files"] if f["status"] == "rejected")
    assert rep.summary_line() == "ingested 5, rejected 3, skipped 0"


def _burned_in_risk(path: Path, cfg: IngestConfig) -> bool:
    """Whether the default burned-in policy refuses a DICOM for its kind, judged from its header here."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    sop = ds.get("SOPClassUID")
    secondary = sop is not None and "Secondary Capture" in pydicom.uid.UID(str(sop)).name
    kinds = cfg.burned_in_unless_declared
    risky = (secondary and "SC" in kinds) or ds.get("Modality") in kinds
    return risky and str(ds.get("BurnedInAnnotation", "")).upper() != "NO"


def test_dicom_fixtures_are_all_accounted_for(shared_data: Path, tmp_path: Path) -> None:
    fixtures = shared_data / "dicom_fixtures"
    rows = list(csv.DictReader((fixtures / "FIXTURES.tsv").open(), delimiter="\t"))
    store = Store(tmp_path / "store")
    rep = ingest([fixtures / r["file"] for r in rows], store, IngestConfig(workers=1))
    by_name = {Path(f.path).name: f for f in rep.files}
    assert len(by_name) == 30 and rep.counts["skipped"] == 0
    assert rep.counts["ingested"] + rep.counts["rejected"] == 30
    for r in rows:
        f = by_name[r["file"]]
        decodes = r["decode_pydicom+pylibjpeg+gdcm"].startswith("OK")
        policy_reject = r["Modality"] in {"SEG", "RTDOSE", "SR"}
        if not policy_reject and _burned_in_risk(fixtures / r["file"], IngestConfig()):
            # Secondary Captures, US and OT that do not declare BurnedInAnnotation NO, decodable or not.
            assert f.status == "rejected" and (f.reason or "").startswith("burned-in text risk"), r["file"]
        elif decodes and not policy_reject:
            assert f.status == "ingested", f"{r['file']} should be ingested: {f.reason}"
        else:
            assert f.status == "rejected" and f.reason, f"{r['file']} should be rejected with a reason"
    assert store.read().num_rows == rep.counts["ingested"]


@pytest.mark.integration
def test_nih_cxr1000_gives_1000_labelled_rows_and_reingest_adds_none(
    shared_data: Path, tmp_path: Path
) -> None:
    root = shared_data / "nih_cxr1000"
    store = Store(tmp_path / "store")
    rep = ingest([root], store, IngestConfig())  # every core, as a user runs it
    rejected = {Path(f.path): f.reason or "" for f in rep.files if f.status == "rejected"}
    assert {p.name for p in rejected if p.suffix != ".png"} == {"labels.csv", "SOURCE.md"}  # not images
    # The burned-in text screen may refuse a few radiographs (2 of these 1000 when it was tuned); every
    # other image is ingested with its folder label.
    screened = [p for p in rejected if p.suffix == ".png"]
    assert all(rejected[p].startswith("burned-in text suspected (") for p in screened)
    assert len(screened) <= 5
    n = 1000 - len(screened)
    assert rep.counts == {"seen": 1000 + 2, "ingested": n, "rejected": 2 + len(screened), "skipped": 0}
    t = store.read()
    assert t.num_rows == n and store.version() == 0
    labels = t.column("label").to_pylist()
    for label in ("0_normal", "1_abnormal"):
        assert labels.count(label) == 500 - sum(p.parent.name == label for p in screened)
    # ChestX-ray14 names carry the patient (00000005_000.png): one patient never straddles two splits.
    by_patient: dict[str, set[str]] = {}
    for p, s in zip(t.column("patient_key").to_pylist(), t.column("split").to_pylist(), strict=True):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values()) and len(by_patient) < 1000
    again = ingest([root], store, IngestConfig())
    assert again.version is None and again.counts["skipped"] == n and store.version() == 0


def test_one_store_holds_one_kind_of_image(tree: Path, tmp_path: Path) -> None:
    from medvae.data.store import StoreError

    store = Store(tmp_path / "store")
    ingest([tree / "normal"], store, IngestConfig(workers=1, intensity="clahe"))
    assert store.image_settings() == {
        "size": 64,
        "aspect": "pad",
        "intensity": "clahe",
        "clahe_clip_limit": 0.01,
    }
    with pytest.raises(StoreError, match="intensity=clahe"):
        ingest([tree / "pneumonia"], store, IngestConfig(workers=1, intensity="none"))
    assert store.version() == 0  # nothing was written by the refused ingest
    rep = ingest([tree / "pneumonia"], store, IngestConfig(workers=1, intensity="clahe"))
    assert rep.version == 1


def test_clahe_at_ingest_standardises_the_stored_pixels(tree: Path, tmp_path: Path) -> None:
    raw, std = Store(tmp_path / "raw"), Store(tmp_path / "std")
    ingest([tree / "normal"], raw, IngestConfig(workers=1, intensity="none"))
    ingest([tree / "normal"], std, IngestConfig(workers=1, intensity="clahe"))
    a, b = images_from(raw.read()), images_from(std.read())
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert b.std() > a.std()  # histogram equalisation stretches the contrast of the noise images


def _text_scan(path: Path, text: str) -> Path:
    """A smooth 256 px 'radiograph' with a line of white text in its top band (3.5 stored px tall)."""
    from PIL import ImageDraw, ImageFont

    yy, xx = np.mgrid[0:256, 0:256]
    img = Image.fromarray((60 + 80 * np.exp(-((xx - 128) ** 2 + (yy - 140) ** 2) / 6000.0)).astype(np.uint8))
    if text:
        ImageDraw.Draw(img).text((6, 4), text, fill=255, font=ImageFont.load_default(size=18))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.mark.parametrize("policy", ["reject", "ingest"])
def test_the_batched_text_screen_rejects_or_notes_only_the_files_with_text(
    tmp_path: Path, policy: str
) -> None:
    # One decode batch (one worker) mixes files with and without text: the screen runs over the batch
    # at once, and its verdicts must land on the right files.
    root = tmp_path / "src"
    texted = {f"t{i}.png" for i in (1, 4)}
    for i in range(6):
        _text_scan(root / f"t{i}.png", "DOE^JOHN DOB 1912-12-01" if f"t{i}.png" in texted else "")
        (root / f"t{i}.png").write_bytes((root / f"t{i}.png").read_bytes() + bytes([i]))  # distinct files
    rep = ingest([root], Store(tmp_path / "store"), IngestConfig(workers=1, burned_in_text=policy))
    by_name = {Path(f.path).name: f for f in rep.files}
    flagged = {n for n, f in by_name.items() if f.reason and f.reason.startswith("burned-in text suspected")}
    assert flagged == texted
    want = "rejected" if policy == "reject" else "ingested"
    assert all(by_name[n].status == want for n in texted)
    assert all(f.status == "ingested" for n, f in by_name.items() if n not in texted)
    assert rep.rows_added == (4 if policy == "reject" else 6)
    assert not any("DOE" in (f.reason or "") or "1912" in (f.reason or "") for f in rep.files)


def test_large_scans_are_text_screened_alone_and_a_batch_does_not_hold_them(tmp_path: Path) -> None:
    import tracemalloc

    from PIL import ImageDraw, ImageFont

    from medvae.data.ingest import DecodeContext, KnownIds, decode_many

    root = tmp_path / "big"
    root.mkdir()
    yy, xx = np.mgrid[0:1200, 0:1200]
    base = (60 + 80 * np.exp(-((xx - 600) ** 2 + (yy - 660) ** 2) / 130000.0)).astype(np.uint8)
    for i in range(12):
        img = Image.fromarray(np.clip(base.astype(int) + i, 0, 255).astype(np.uint8))
        if i in (3, 8):  # a patient-like line, about 4 px tall once stored at 64 px
            font = ImageFont.load_default(size=95)
            ImageDraw.Draw(img).text((30, 20), "DOE^JOHN DOB 1912", fill=255, font=font)
        img.save(root / f"scan{i:02d}.png")
    jobs = [(str(p), None) for p in sorted(root.iterdir())]
    ctx = DecodeContext(b"k" * 32, KnownIds(), IngestConfig())
    tracemalloc.start()
    try:
        results = decode_many(jobs, ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rejected = {Path(r.path).name for r in results if r.status == "rejected"}
    assert rejected == {"scan03.png", "scan08.png"}
    assert all("burned-in text suspected" in (r.reason or "") for r in results if r.status == "rejected")
    assert sum(len(r.rows) for r in results) == 10
    # Twelve decoded 1200 px images are 69 MB of float32; one at a time (plus its decode) stays far under.
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"
