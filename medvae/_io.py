"""Small I/O helpers shared by every stage: atomic writes (with fsync) and safe file names."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # numpy costs every command's start-up; only write_png needs it
    import numpy as np


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, rename, fsync the folder.

    A reader (or a crash) sees the old file or the new one, whole, never half of it.

    Args:
        path: the destination; its folder is created if needed.
        data: the bytes.
        mode: file permissions to set before the rename (e.g. 0o644); None keeps mkstemp's 0o600.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` itself (not possible on every platform; best effort)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_bounded(fh: BinaryIO, expected: int, limit: int) -> bytes:
    """The rest of an open file, reading at most ``limit + 1`` bytes, sized for the ``expected`` length.

    ``fh.read(limit + 1)`` allocates its whole buffer up front: with ``max_file_bytes`` at 2 GB, that was
    a 2 GB allocation for every 20 KB JPEG. A file that grew since it was stat'ed is read on, still
    within the bound, so the caller can tell it is over the limit.
    """
    data = fh.read(min(expected, limit) + 1)
    if len(data) > expected and len(data) <= limit:
        data += fh.read(limit + 1 - len(data))
    return data


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=0o644)


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, indented, trailing newline): the same object gives the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> Path:
    """:func:`atomic_write_bytes` of :func:`json_bytes`."""
    return atomic_write_bytes(path, json_bytes(obj), mode=0o644)


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue(), mode=0o644)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str | None, fallback: str, max_len: int = 100) -> str:
    """A file-system-safe single path component of [A-Za-z0-9._-]: no separator, no leading dot, never empty.

    Labels and ids come from folder names and CSVs medvae does not control, so they must not be able to
    point a file outside its folder or hide it.
    """
    name = _UNSAFE.sub("_", text or "").strip("._")
    return name[:max_len] or fallback


# Tab is harmless and separates columns; every other C0/C1 control character and DEL is escaped.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` safe for a terminal or a log line: every control character shown as an escape.

    File names, DICOM values and decoder messages are untrusted: an ANSI escape sequence in a file name
    would recolour or rewrite the operator's terminal, and a newline would forge a log line.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
