from __future__ import annotations

from pathlib import Path

import pytest

from medvae.data.store import Store


@pytest.mark.integration
def test_ingest_flow_on_the_sample(prefect_harness: None, sample_dir: Path, tmp_path: Path) -> None:
    from flows.ingest import ingest_flow

    store = str(tmp_path / "store")
    res = ingest_flow([str(sample_dir)], store, {"workers": 1}, str(tmp_path / "report.json"))
    assert res.version == 0
    assert res.ingested + res.rejected + res.skipped == res.seen
    assert res.rejected == 1  # the truncated MR in data/sample/dicom_examples
    assert Store(store).read().num_rows == res.rows_added == res.ingested
    again = ingest_flow([str(sample_dir)], store, {"workers": 1})
    assert again.version is None and again.skipped == res.ingested
