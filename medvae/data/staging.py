"""Staging files for batched runs: plans, per-batch rows and results, on a local disk or object storage."""

from __future__ import annotations

import os
from typing import Any


def filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path for a local path or an object-store URI (``s3://...``).

    Object-store credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_ENDPOINT_URL`` ...), as for the store itself.
    """
    from pyarrow import fs as pafs

    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; a reader never sees half of it."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    local = "://" not in uri
    if local:  # object stores have no folders; creating one leaves an empty marker object behind
        fs.create_dir(parent, recursive=True)
    # A local file is written beside its final name and renamed; an object-store PUT is atomic by itself.
    tmp = f"{parent}/.tmp-{os.getpid()}-{os.urandom(4).hex()}" if local else path
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    if tmp != path:
        fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    """Read a whole file.

    Raises:
        FileNotFoundError: when it does not exist.
    """
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as inp:
        return bytes(inp.read())


def remove_tree(uri: str) -> None:
    """Delete a staging folder and everything in it (missing is fine)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def staging_uri(base: str, run_id: str) -> str:
    """``<base>/_medvae/staging/<run_id>``: beside a store, Delta Lake ignores it (leading underscore)."""
    return f"{base.rstrip('/')}/_medvae/staging/{run_id}"
