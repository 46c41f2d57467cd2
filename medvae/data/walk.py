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
    """:func:`walk_paths` with each path as a :class:`~pathlib.Path`."""
    for path, reason in walk_paths(sources, follow_external_symlinks=follow_external_symlinks):
        yield Path(path), reason


def walk_paths(
    sources: Sequence[Path], *, follow_external_symlinks: bool = False
) -> Iterator[tuple[str, str | None]]:
    """Yield every file under ``sources`` (files or folders), with a walk error when one occurred.

    Directory symlinks are not followed, so a symlink loop cannot trap the walk; such links are yielded
    with a reason so that they are still accounted for. File symlinks whose target lies outside the
    source folder are not followed either (unless ``follow_external_symlinks``): through one, an ingest
    read ``/etc/passwd`` and the store's own key. A source given by name is read even when it is a link.
    Order is sorted for reproducible reports: each folder's links to folders, then its files, then its
    subfolders, each by name.

    Paths are strings spelled as :class:`~pathlib.Path` spells them, and the walk reads each folder once
    with ``os.scandir``: a no-op re-ingest is mostly this walk, and a ``Path`` and an ``lstat`` per file
    were half of it.

    Args:
        sources: files and folders to walk.
        follow_external_symlinks: read file symlinks that leave their source folder.

    Yields:
        ``(path, None)`` for a file to decode, ``(path, reason)`` for one refused by the walk.
    """
    for source in sources:
        src = str(Path(source))
        if not os.path.lexists(src):
            yield src, "does not exist"
            continue
        if not os.path.isdir(src):
            # Files, and also what is neither file nor folder (a FIFO, a device, a symlink loop or a
            # dangling link): the decoder stage says exactly what is wrong with it, where a walk would
            # only report "cannot list folder: Not a directory".
            yield src, None
            continue
        root_real = os.path.realpath(src)
        errors: list[tuple[str, OSError]] = []
        for folder, dirs, files in _folders(src, errors):
            for d in dirs:
                if d.is_symlink():
                    yield _child(folder, d.name), (
                        "directory symlink not followed (avoids loops; pass its target explicitly)"
                    )
            for f in files:
                path = _child(folder, f.name)
                if not follow_external_symlinks and f.is_symlink() and not _inside(path, root_real):
                    yield path, (
                        "symlink to a file outside the source folder, not followed (pass the target "
                        "explicitly, or set follow_external_symlinks: true)"
                    )
                else:
                    yield path, None
        for where, err in errors:
            yield where, f"cannot list folder: {err.strerror or type(err).__name__}"


def _folders(
    top: str, errors: list[tuple[str, OSError]]
) -> Iterator[tuple[str, list[os.DirEntry[str]], list[os.DirEntry[str]]]]:
    """Top-down over the folders under ``top`` (links to folders listed, not entered): each folder with
    its subfolders and its other entries, both sorted by name, as ``os.walk`` gives them."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            errors.append((exc.filename or folder, exc))
            continue
        dirs: list[os.DirEntry[str]] = []
        files: list[os.DirEntry[str]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a link, as os.walk classifies it
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry)
        yield folder, dirs, files
        stack.extend(_child(folder, d.name) for d in reversed(dirs) if not d.is_symlink())


def _child(folder: str, name: str) -> str:
    """``str(Path(folder) / name)`` without building a Path (``Path(".") / name`` is just ``name``)."""
    if folder == ".":
        return name
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


def _inside(link: str, root_real: str) -> bool:
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
def label_for(path: str, cfg: IngestConfig, csv_labels: dict[str, str] | None) -> str | None:
    """The label of one file: from the labels CSV when one is given, else by the config's policy."""
    if csv_labels is not None:
        full = os.path.normpath(os.path.realpath(path))
        return csv_labels.get(full, csv_labels.get(os.path.basename(path)))
    if cfg.labels == "folder":
        # basename(dirname(path)) for the paths the walk spells (no doubled or trailing slashes), with
        # string methods: this runs for every file of every (re-)ingest.
        return path.rpartition("/")[0].rpartition("/")[2] or None
    return None
