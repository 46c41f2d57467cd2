from __future__ import annotations

from medvae.config import DEFAULT_PATIENT_REGEX
from medvae.data.deid import (
    ALLOWED_META,
    allowed_meta,
    keyed_hash,
    patient_from_name,
    split_for,
)


def test_keyed_hash_depends_on_key_and_domain() -> None:
    a = keyed_hash(b"k1", "source", b"data")
    assert a == keyed_hash(b"k1", "source", b"data")
    assert a != keyed_hash(b"k2", "source", b"data")
    assert a != keyed_hash(b"k1", "patient", b"data")
    assert len(a) == 64 and b"data".hex() not in a


def test_patient_from_name_defaults() -> None:
    r = DEFAULT_PATIENT_REGEX
    assert patient_from_name("person12_virus_33.jpeg", r) == "person12"
    assert patient_from_name("IM-0115-0001.jpeg", r) == "IM-0115"
    assert patient_from_name("NORMAL2-IM-1427-0001.jpeg", r) == "NORMAL2-IM-1427"
    assert patient_from_name("00000005_001.png", r) == "00000005"
    assert patient_from_name("scan.png", r) is None
    assert patient_from_name("person1.png", None) is None


def test_allowed_meta_drops_everything_else() -> None:
    meta = allowed_meta({"modality": "CT", "PatientName": "DOE^JOHN", "InstitutionName": "X"})
    assert set(meta) == set(ALLOWED_META)
    assert meta["modality"] == "CT"
    assert "DOE^JOHN" not in repr(meta)


def test_split_is_grouped_stable_and_proportional() -> None:
    key = b"0" * 32
    fr = (0.8, 0.1, 0.1)
    splits = [split_for(key, f"patient{i}", fr) for i in range(4000)]
    assert splits == [split_for(key, f"patient{i}", fr) for i in range(4000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.76 < share["train"] < 0.84 and 0.08 < share["val"] < 0.12 and 0.08 < share["test"] < 0.12
    assert split_for(b"1" * 32, "patient1", (0.0, 0.0, 1.0)) == "test"


def test_redact_config_removes_paths_at_any_depth() -> None:
    from medvae.data.deid import redact_config

    cfg = {
        "sources": ["/data/DOE_JOHN", "/x"],
        "ingest": {"labels_csv": "/p/SMITH/l.csv", "size": 64},
        "n": [1],
    }
    out = redact_config(cfg)
    assert "DOE_JOHN" not in repr(out) and "SMITH" not in repr(out)
    assert out["ingest"]["size"] == 64 and out["n"] == [1]
    assert out["sources"] == "<2 paths, not recorded>"
    assert redact_config({"labels_csv": None}) == {"labels_csv": None}
