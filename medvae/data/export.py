"""Export a store version as PNG files in ImageFolder layout with a manifest.csv.

The store may be local or on an object store (``s3://...``); the export is always written to a local
folder.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from medvae.data.store import Store, images_from

MANIFEST_COLUMNS = ("id", "label", "origin", "split", "anomaly_score", "anomaly_flag", "path")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# A URI scheme (two letters or more, so that a Windows drive such as C:/ is not one), as left by Path(),
# which folds "s3://bucket/x" into "s3:/bucket/x".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def safe_name(text: str | None, fallback: str) -> str:
    """A file-system-safe single path component: no separators, no '..', never empty.

    Labels come from folder names or CSVs that medvae does not control, so they must not be able to
    point an export outside its folder.
    """
    name = _SAFE.sub("_", text or "").strip("._")
    return name[:100] or fallback


def export(store: Store, out: str | os.PathLike[str], version: int | None = None) -> Path:
    """Write every image of a version as ``out/<label>/<id>.png`` plus ``out/manifest.csv``.

    Args:
        store: the store to read (local or on an object store).
        out: the local export folder (created).
        version: the version to export, latest when None (time travel: any earlier version).

    Returns:
        The manifest path.

    Raises:
        ValueError: when ``out`` is a URI rather than a local folder.
        StoreError: when the store or the version does not exist.
    """
    if _URI.match(str(out)):
        # Path("s3://b/x") is the local folder "s3:/b/x": writing there would look like success.
        raise ValueError(
            f"export writes PNG files to a local folder, not to {out}: export locally, then copy the "
            "folder (e.g. `aws s3 sync`)"
        )
    out = Path(out)
    table = store.read(version)
    images = images_from(table)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    cols = table.select(["id", "label", "origin", "split", "anomaly_score", "anomaly_flag"]).to_pydict()
    manifest = out / "manifest.csv"
    tmp = out / f".manifest.csv.tmp{os.getpid()}"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for i, img in enumerate(images):
            label = cols["label"][i]
            folder = safe_name(label, "unlabelled")
            rel = Path(folder) / f"{safe_name(cols['id'][i], f'row{i}')}.png"
            dest = (root / rel).resolve()
            if root not in dest.parents:  # defence in depth: safe_name already forbids this
                raise ValueError(f"refusing to write outside the export folder: {rel}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img), mode="L").save(dest, optimize=False)
            score = cols["anomaly_score"][i]
            flag = cols["anomaly_flag"][i]
            writer.writerow(
                [
                    cols["id"][i],
                    label or "",
                    cols["origin"][i],
                    cols["split"][i] or "",
                    "" if score is None else f"{score:.6g}",
                    "" if flag is None else int(flag),
                    rel.as_posix(),
                ]
            )
    os.replace(tmp, manifest)
    return manifest
