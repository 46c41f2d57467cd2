"""Export a store version as PNG files in ImageFolder layout with a manifest.csv.

The store may be local or on an object store (``s3://...``); the export is always written to a local
folder, which afterwards holds exactly one export:

* ``<folder>/<id>.png`` for every row, where ``<folder>`` is the row's label made safe for a file system.
  Labels come from folder names and CSVs medvae does not control, so the mapping never lets a label point
  outside the export, and it never lets two labels share a folder: ``..``, ``.``, the empty label, ``a b``
  and ``a_b``, ``Normal`` and ``normal`` (one folder on a case-insensitive disk) each get their own.
  A label that is already a safe name keeps it; any other gets its safe form plus a digest of the label,
  so the same label gets the same folder in every export. ``folders.csv`` lists the mapping.
* ``manifest.csv``: one line per PNG (id, label, origin, split, anomaly score and flag, path).
  Manifests are opened in spreadsheets, which run a cell that starts with ``=``, ``+``, ``-``, ``@``, tab
  or carriage return as a formula (CSV injection); every text field that starts so is written with a
  leading ``'``, which spreadsheets show as text. Folder names never start so, so paths are never altered.
* ``export.json``: what was exported (store, version, rows); it marks the folder as a medvae export.

The export is built in a hidden folder beside the destination and swapped in as a whole, so a reader
never sees half an export, and files of an earlier export never linger among the new ones. A destination
that is a non-empty folder but not a medvae export is refused rather than replaced.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from medvae._io import fsync_dir, json_bytes, safe_name
from medvae.data.store import Store, images_from

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["EXPORT_FORMAT", "MANIFEST_COLUMNS", "export", "folder_table", "neutralise"]

MANIFEST_COLUMNS = ("id", "label", "origin", "split", "anomaly_score", "anomaly_flag", "path")
FOLDER_COLUMNS = ("label", "folder", "rows")
MANIFEST, FOLDERS, MARKER = "manifest.csv", "folders.csv", "export.json"
EXPORT_FORMAT = "medvae-export"
# The folder of rows without a label (None); a label spelled "unlabelled" gets it first.
UNLABELLED = "unlabelled"
# A URI scheme (two letters or more, so that a Windows drive such as C:/ is not one), as left by Path(),
# which folds "s3://bucket/x" into "s3:/bucket/x".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
# What a spreadsheet takes as the start of a formula (OWASP's list for CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """``text`` safe as a spreadsheet cell: prefixed with ``'`` when it would start a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _digest(label: str | None) -> str:
    return hashlib.sha256(b"\x00none" if label is None else label.encode("utf-8")).hexdigest()[:8]


def _safe_folder(label: str) -> str:
    """A label's safe single path component: [A-Za-z0-9._-], no leading dot or dash, never empty."""
    return safe_name(label, "label", max_len=80).lstrip("-") or "label"


def folder_table(labels: Iterable[str | None]) -> dict[str | None, str]:
    """The export folder of every label: distinct, also on a case-insensitive disk, and stable.

    Args:
        labels: the labels of the rows (None for unlabelled rows); repeats are fine.

    Returns:
        label -> folder name, one distinct folder per distinct label.
    """
    ordered = sorted(set(labels), key=lambda lbl: (lbl is None, lbl or ""))
    table: dict[str | None, str] = {}
    taken: set[str] = set()  # case-folded: Normal/ and normal/ are one folder on macOS and Windows

    def claim(label: str | None, name: str) -> None:
        table[label] = name
        taken.add(name.casefold())

    # Labels that are safe names already keep them exactly (on a case clash, the first in sorted order).
    for label in ordered:
        if label is not None and _safe_folder(label) == label and label.casefold() not in taken:
            claim(label, label)
    for label in ordered:
        if label in table:
            continue
        if label is None and UNLABELLED not in taken:
            claim(None, UNLABELLED)
            continue
        base = UNLABELLED if label is None else _safe_folder(label)
        name, n = f"{base}-{_digest(label)}", 2
        while name.casefold() in taken:  # only an adversarial label set gets here
            name, n = f"{base}-{_digest(label)}-{n}", n + 1
        claim(label, name)
    return table


def export(store: Store, out: str | os.PathLike[str], version: int | None = None) -> Path:
    """Write every image of a version as ``out/<folder>/<id>.png`` plus ``manifest.csv``.

    Args:
        store: the store to read (local or on an object store).
        out: the local export folder: absent, empty, or an earlier medvae export (replaced whole).
        version: the version to export, latest when None (time travel: any earlier version).

    Returns:
        The manifest path.

    Raises:
        ValueError: when ``out`` is a URI rather than a local folder, or a file, or a non-empty folder
            that is not a medvae export.
        StoreError: when the store or the version does not exist.
    """
    if _URI.match(str(out)):
        # Path("s3://b/x") is the local folder "s3:/b/x": writing there would look like success.
        raise ValueError(
            f"export writes PNG files to a local folder, not to {out}: export locally, then copy the "
            "folder (e.g. `aws s3 sync`)"
        )
    dest = Path(out).resolve()
    _check_destination(dest)
    # Pinned first, so that a commit during the export cannot make the marker name another version.
    pinned = store.table(version).version()
    table = store.read(pinned)
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        n = _write_export(build, table)
        marker = {"format": EXPORT_FORMAT, "store": store.uri, "version": pinned, "rows": n}
        (build / MARKER).write_bytes(json_bytes(marker))
        _swap_in(build, dest)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # the build folder, or after the swap the old export
    return dest / MANIFEST


def _check_destination(dest: Path) -> None:
    """Refuse a destination that an export must not replace."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ValueError(
            f"export folder {dest} is a file; give a folder (absent, empty or an earlier export)"
        )
    if any(dest.iterdir()) and not _is_export(dest):
        raise ValueError(
            f"export folder {dest} is not empty and holds no medvae export ({MARKER} or {MANIFEST}); "
            "refusing to replace it: give an empty or new folder"
        )


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a medvae export: its marker, or (written before markers) its manifest."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    with contextlib.suppress(OSError, UnicodeDecodeError), (folder / MANIFEST).open(encoding="utf-8") as fh:
        return next(csv.reader(fh), None) == list(MANIFEST_COLUMNS)
    return False


def _write_export(root: Path, table: pa.Table) -> int:
    """Write the PNGs, manifest.csv and folders.csv of ``table`` into ``root``; the number of PNGs."""
    images = images_from(table)
    cols = table.select(["id", "label", "origin", "split", "anomaly_score", "anomaly_flag"]).to_pydict()
    folders = folder_table(cols["label"])
    for name in set(folders.values()):
        (root / name).mkdir()
    lines = []
    for i, img in enumerate(images):
        rel = f"{folders[cols['label'][i]]}/{safe_name(cols['id'][i], f'row{i}')}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(root / rel, optimize=False)
        score, flag = cols["anomaly_score"][i], cols["anomaly_flag"][i]
        lines.append(
            [
                *(neutralise(cols[c][i] or "") for c in ("id", "label", "origin", "split")),
                "" if score is None else f"{score:.6g}",
                "" if flag is None else str(int(flag)),
                neutralise(rel),
            ]
        )
    _write_csv(root / MANIFEST, MANIFEST_COLUMNS, lines)
    counts = Counter(cols["label"])
    # The unlabelled folder's label cell is empty, like the label cells of its rows in the manifest.
    table_rows = [[neutralise(lbl or ""), folder, str(counts[lbl])] for lbl, folder in folders.items()]
    _write_csv(root / FOLDERS, FOLDER_COLUMNS, sorted(table_rows, key=lambda r: r[1]))
    return len(lines)


def _write_csv(path: Path, header: Sequence[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _swap_in(build: Path, dest: Path) -> None:
    """Put the folder ``build`` at ``dest``; an earlier export there ends up at ``build``'s path.

    An absent or empty ``dest`` is replaced by one rename. A full one is exchanged with ``build`` in one
    step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), else moved aside first, so that
    ``dest`` is missing for the moment between two renames but never holds a mixture of exports.
    """
    fsync_dir(build)
    with contextlib.suppress(OSError):  # absent, or not empty: exchanged below
        dest.rmdir()
    if not dest.exists():
        os.replace(build, dest)
    elif not _exchange(build, dest):
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, aside / "old")
        os.replace(build, dest)
        os.replace(aside / "old", build)  # removed by the caller, with the build folder
        aside.rmdir()
    fsync_dir(dest.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux 3.15+); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)
