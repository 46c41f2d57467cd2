"""Walking the sources of an ingest: every file under the given folders, and the label of each."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from medvae.config import IngestConfig


# ------------------------------------------------------------------------------------------- walking
def iter_files(
    sources: Sequence[Path], *, follow_external_symlinks: bool = False
) -> Iterator[tuple[Path, str | None]]:
    """Yield every file under ``sources`` (files or folders), with a walk error when one occurred.

    Directory symlinks are not followed, so a symlink loop cannot trap the walk; such links are yielded
    with a reason so that they are still accounted for. File symlinks whose target lies outside the
    source folder are not followed either (unless ``follow_external_symlinks``): through one, an ingest
    read ``/etc/passwd`` and the store's own key. A source given by name is read even when it is a link.
    Order is sorted for reproducible reports.

    Args:
        sources: files and folders to walk.
        follow_external_symlinks: read file symlinks that leave their source folder.

    Yields:
        ``(path, None)`` for a file to decode, ``(path, reason)`` for one refused by the walk.
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
        root_real = os.path.realpath(src)
        errors: list[OSError] = []
        for root, dirs, files in os.walk(src, onerror=errors.append, followlinks=False):
            dirs.sort()
            for d in list(dirs):
                p = Path(root) / d
                if p.is_symlink():
                    yield p, "directory symlink not followed (avoids loops; pass its target explicitly)"
            for name in sorted(files):
                p = Path(root) / name
                if not follow_external_symlinks and p.is_symlink() and not _inside(p, root_real):
                    yield p, (
                        "symlink to a file outside the source folder, not followed (pass the target "
                        "explicitly, or set follow_external_symlinks: true)"
                    )
                else:
                    yield p, None
        for err in errors:
            yield Path(err.filename or str(src)), f"cannot list folder: {err.strerror or err}"


def _inside(link: Path, root_real: str) -> bool:
    """Whether ``link`` resolves (through every hop of a chain of links) to a path under ``root_real``."""
    target = os.path.realpath(link)
    return os.path.commonpath([target, root_real]) == root_real


def read_labels_csv(path: Path) -> dict[str, str]:
    """Read a ``path,label`` CSV. Paths may be relative to the CSV's folder, absolute, or bare file names.

    Raises:
        ValueError: naming the file, when it lacks the columns or is not valid UTF-8.
    """
    out: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path}: a labels CSV needs the columns path,label (got {reader.fieldnames})"
                )
            for row in reader:
                p = Path(row["path"])
                full = p if p.is_absolute() else (path.parent / p)
                out[os.path.normpath(full.resolve())] = row["label"]
                out.setdefault(p.name, row["label"])
    except UnicodeDecodeError as exc:
        # The offending bytes stay out of the message: they may be part of a patient's name.
        raise ValueError(
            f"{path}: not valid UTF-8 (at byte {exc.start}); save the labels CSV as UTF-8"
        ) from None
    return out


# ------------------------------------------------------------------------------------------- ingest
def label_for(path: Path, cfg: IngestConfig, csv_labels: dict[str, str] | None) -> str | None:
    """The label of one file: from the labels CSV when one is given, else by the config's policy."""
    if csv_labels is not None:
        return csv_labels.get(os.path.normpath(path.resolve()), csv_labels.get(path.name))
    if cfg.labels == "folder":
        return path.parent.name or None
    return None
