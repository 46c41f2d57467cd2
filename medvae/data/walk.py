"""Walking the sources of an ingest: every file under the given folders, and the label of each."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from medvae.config import IngestConfig


# ------------------------------------------------------------------------------------------- walking
def iter_files(sources: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """Yield every file under ``sources`` (files or folders), with a walk error when one occurred.

    Directory symlinks are not followed, so a symlink loop cannot trap the walk; such links are yielded
    with a reason so that they are still accounted for. Order is sorted for reproducible reports.
    """
    for src in sources:
        if not os.path.lexists(src):
            yield src, "does not exist"
            continue
        if not src.is_dir():
            # Files, and also what is neither file nor folder (a FIFO, a device, a symlink loop or a
            # dangling link): the decoder stage says exactly what is wrong with it, where os.walk would
            # only report "cannot list folder: Not a directory".
            yield src, None
            continue
        errors: list[OSError] = []
        for root, dirs, files in os.walk(src, onerror=errors.append, followlinks=False):
            dirs.sort()
            for d in list(dirs):
                p = Path(root) / d
                if p.is_symlink():
                    yield p, "directory symlink not followed (avoids loops; pass its target explicitly)"
            for name in sorted(files):
                yield Path(root) / name, None
        for err in errors:
            yield Path(err.filename or str(src)), f"cannot list folder: {err.strerror or err}"


def read_labels_csv(path: Path) -> dict[str, str]:
    """Read a ``path,label`` CSV. Paths may be relative to the CSV's folder, absolute, or bare file names."""
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a labels CSV needs the columns path,label (got {reader.fieldnames})")
        for row in reader:
            p = Path(row["path"])
            full = p if p.is_absolute() else (path.parent / p)
            out[os.path.normpath(full.resolve())] = row["label"]
            out.setdefault(p.name, row["label"])
    return out


# ------------------------------------------------------------------------------------------- ingest
def label_for(path: Path, cfg: IngestConfig, csv_labels: dict[str, str] | None) -> str | None:
    """The label of one file: from the labels CSV when one is given, else by the config's policy."""
    if csv_labels is not None:
        return csv_labels.get(os.path.normpath(path.resolve()), csv_labels.get(path.name))
    if cfg.labels == "folder":
        return path.parent.name or None
    return None
