"""The ingest and screen flows on a Dask cluster (and Prefect's thread pool) give the default run's output."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvae.config import ModelConfig, TrainConfig
from medvae.data.store import Store
from medvae.jobs.train import train_job

# Two real Dask clusters and a full screen each: about a minute on two cores, so -m slow.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """An existing local Dask cluster (2 worker processes on loopback), as a site would run one."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


def _table(store: Store) -> list[tuple[object, ...]]:
    t = store.read().to_pydict()
    names = sorted(t)
    return sorted(zip(*(t[n] for n in names), strict=True), key=lambda r: str(r[names.index("id")]))


def _sources(sample_dir: Path, shared_data: Path, tmp_path: Path) -> list[str]:
    # Real scans: the bundled sample (PNG + DICOM) and the DICOM fixtures with their broken files, plus a
    # copy of one scan so that de-duplication across batches is exercised.
    extra = tmp_path / "extra"
    extra.mkdir()
    first = sorted((sample_dir / "normal").iterdir())[0]
    shutil.copy(first, extra / "copy_of_first.png")
    return [str(sample_dir), str(shared_data / "dicom_fixtures"), str(extra)]


def test_dask_and_thread_runners_ingest_exactly_the_default_store(
    prefect_harness: None, dask_address: str, sample_dir: Path, shared_data: Path, tmp_path: Path
) -> None:
    from flows.ingest import ingest_flow

    sources = _sources(sample_dir, shared_data, tmp_path)
    base = ingest_flow(sources, str(tmp_path / "a"), {"workers": 1})
    assert base.skipped >= 1 and base.rejected >= 5
    expected = _table(Store(tmp_path / "a"))
    for name, runner in {
        "dask": {"kind": "dask", "address": dask_address, "batch_files": 16},
        "thread": {"kind": "thread", "workers": 2, "batch_files": 40},
    }.items():
        dest = tmp_path / name
        (dest / "_medvae").mkdir(parents=True)  # the same key, so that the keyed ids compare
        shutil.copy(tmp_path / "a" / "_medvae" / "store.key", dest / "_medvae" / "store.key")
        res = ingest_flow(sources, str(dest), {"workers": 1}, str(tmp_path / f"{name}.json"), runner)
        assert res == base, name
        assert _table(Store(dest)) == expected, name
        assert Store(dest).version() == 0  # one commit, by the flow
        staging = dest / "_medvae" / "staging"
        assert not staging.exists() or not any(staging.iterdir())


def test_dask_screen_writes_the_default_csv_and_heatmaps(
    prefect_harness: None,
    dask_address: str,
    sample_dir: Path,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flows.ingest import ingest_flow
    from flows.screen import screen_flow

    store = str(tmp_path / "store")
    ingest_flow([str(sample_dir)], store, {"workers": 1})
    tiny = TrainConfig(
        model=ModelConfig(channels=(8, 16), latent_dim=4), epochs=1, batch_size=8, patience=1, device="cpu"
    )
    model = tmp_path / "models" / "m"
    train_job(store, model, tiny, progress=False)
    # New scans, none of them the model's own (val) images, whose scores tie the calibration's exactly.
    used = {p.name for p in sample_dir.rglob("*")}
    new = tmp_path / "new"
    new.mkdir()
    for p in sorted((shared_data / "kermany_train" / "normal").iterdir())[-30:]:
        if p.name not in used:
            shutil.copy(p, new / p.name)
    sources = [str(new), str(shared_data / "dicom_fixtures")]
    a = screen_flow(str(model), sources, str(tmp_path / "a.csv"), str(tmp_path / "heat_a"))
    runner = {"kind": "dask", "address": dask_address, "batch_files": 16}
    b = screen_flow(str(model), sources, str(tmp_path / "b.csv"), str(tmp_path / "heat_b"), runner)
    assert a == b and a["scored"] > 40 and a["rejected"] >= 5
    # Both paths say that the (training cohort's) threshold may not hold on these new scans.
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("set on normals of the training cohort") >= 2
    rows_a, rows_b = _csv(tmp_path / "a.csv"), _csv(tmp_path / "b.csv")
    # file, status, heat-map name, flag and reason are identical.
    assert [r[:3] + r[5:6] + r[-1:] for r in rows_a] == [r[:3] + r[5:6] + r[-1:] for r in rows_b]
    # Scores agree to float precision, not bit for bit: a forward pass over a batch of 16 on a one-thread
    # worker sums in another order than one over all scans with every thread, and the tiny test model's
    # near-collapsed latent dimensions have precisions large enough to amplify that rounding to ~1e-3.
    for ra, rb in zip(rows_a[1:], rows_b[1:], strict=True):
        for x, y in zip(ra[3:-1], rb[3:-1], strict=True):
            assert (x == y == "") or float(x) == pytest.approx(float(y), rel=1e-2, abs=1e-6)
    pngs_a = sorted(p.name for p in (tmp_path / "heat_a").iterdir())
    assert pngs_a == sorted(p.name for p in (tmp_path / "heat_b").iterdir()) and len(pngs_a) == a["scored"]
    for name in pngs_a:
        pa_, pb_ = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("heat_a", "heat_b"))
        # The same float rounding may move a heat map's colours by a few levels here and there;
        # a different map (another scan, another score) differs in most pixels by far more.
        diff = np.abs(pa_ - pb_)
        assert pa_.shape == pb_.shape and diff.mean() < 0.5 and diff.max() <= 16, name
    assert not any((tmp_path / "models" / "_medvae" / "staging").iterdir())


def _csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))
