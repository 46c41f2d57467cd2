"""De-identification: keyed, irreversible source and patient identifiers, and the metadata allow-list."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

# Technical attributes that describe how an image was acquired and encoded, never who or when.
# Everything a reader returns is filtered through this list before it can reach the store, so a reader
# that grows a new field cannot leak it by accident.
ALLOWED_META: tuple[str, ...] = (
    "source_format",
    "modality",
    "photometric",
    "orig_rows",
    "orig_cols",
    "pixel_spacing",
    "bits_stored",
    "transfer_syntax",
    "sop_class",
    "window",
    "body_part",
    "view_position",
)

def keyed_hash(key: bytes, kind: str, data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under the store's secret key, domain-separated by ``kind``.

    Without the key nobody can confirm a guess (e.g. a patient ID) against the stored hash, yet the
    store itself recognises the same content on re-ingest.

    Args:
        key: the store's secret key.
        kind: a domain label ("source", "patient", "split") so hashes of different things never collide.
        data: the bytes to identify.

    Returns:
        The hex digest.
    """
    return hmac.new(key, kind.encode() + b"\x00" + data, hashlib.sha256).hexdigest()


def patient_from_name(name: str, pattern: str | None) -> str | None:
    """Extract a patient identifier from a file name with ``pattern`` (first non-empty group), if any."""
    if not pattern:
        return None
    m = re.search(pattern, name)
    if not m:
        return None
    groups = [g for g in m.groups() if g] or [m.group(0)]
    return groups[0]


def allowed_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only allow-listed technical attributes; every other key is dropped."""
    return {k: meta.get(k) for k in ALLOWED_META}


def split_for(key: bytes, group: str, fractions: tuple[float, float, float]) -> str:
    """Assign ``group`` (a patient key, or the source when there is none) to train/val/test.

    The bucket comes from a keyed hash, so all images of one patient land in one split, the split is
    stable across re-ingests, and nobody without the key can steer a patient into a split.
    """
    u = int(keyed_hash(key, "split", group.encode())[:12], 16) / float(1 << 48)
    train, val, _ = fractions
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


# Config keys whose values are operator file paths. Folder names often carry patient names, so lineage
# written into the store records that such a path was given, never the path itself.
PATH_KEYS = frozenset({"sources", "labels_csv", "write_dicom"})


def redact_config(config: Any) -> Any:
    """A copy of a JSON-able config with every source/label path replaced by a placeholder."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for k, v in config.items():
            if k in PATH_KEYS and v is not None:
                n = len(v) if isinstance(v, list) else 1
                out[k] = f"<{n} path{'s' if n != 1 else ''}, not recorded>"
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(config, list):
        return [redact_config(v) for v in config]
    return config
