"""The stat cache: files already ingested, recognised by their metadata without reading them.

A re-ingest of a folder that has not changed used to read and HMAC-hash every file in pool workers only
to skip each one, and started the pool to do it. The cache remembers, for every file whose content is in
the store, a keyed hash of *where the file is and what the file system says about it* (absolute path,
device, inode, size, mtime_ns and ctime_ns) with the 128-bit prefix of its source id. A file whose stat
matches an entry whose source id is still in the store is skipped without being opened.

Trade-off. The cache trusts the file system's metadata as make and rsync do, but with ctime as well:
ctime cannot be set from user space and changes on every write, rename into place, chmod or touch, so a
file modified in place (even with its mtime restored) misses the cache and is hashed again; so is a copied
or restored folder (new inodes and ctimes). A miss costs only what every ingest cost before. What the
cache cannot see is a file system that does not update ctime, or content changed by writing to the block
device underneath; whoever ingests from such a place can delete ``_medvae/stat_cache.npy``. The verdict
"already in the store" is still decided against the store's own ids: an entry whose source id is not in
the store (rows deleted, an older version restored) is ignored.

Privacy. Folder and file names carry patient names, so no path is stored: entries are 128-bit keyed BLAKE2b
MACs under the store's secret key (the same key as the source ids), next to source-id prefixes that
are already in the store. It lives beside the store (``_medvae/stat_cache.npy``, a plain ``.npy`` read
without pickle) and is rewritten whole, atomically, after an ingest; of two concurrent ingests the last one
wins and the other's entries are simply hashed again next time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable

import numpy as np

CACHE_FILE = "stat_cache.npy"
_DTYPE = np.dtype([("stat", "S16"), ("source", "S16")])


def stat_key(key: bytes, path: str, st: os.stat_result) -> bytes:
    """The 128-bit keyed hash of a file's absolute path and identifying metadata.

    Keyed BLAKE2b (a MAC by design, under the store's key, personalised so that it never equals another
    medvae hash): one C call per file, a third of what ``hmac.new`` costs. Every file of every re-ingest
    is keyed here, so it is most of what a no-op re-ingest computes. The text hashed is the absolute
    path and the device, inode, size, mtime and ctime, separated by NULs.
    """
    return stat_keys(key, [(path, st)])[0]


def stat_keys(key: bytes, files: Iterable[tuple[str, os.stat_result]]) -> list[bytes]:
    """:func:`stat_key` of many files, with each folder made absolute once rather than each path.

    ``abspath`` of ``folder/name`` (``name`` a plain file name) is ``abspath(folder)`` joined with
    ``name``; it was a third of a no-op re-ingest's time.
    """
    folders: dict[str, str] = {}
    out = []
    for path, st in files:
        folder, sep, name = path.rpartition("/")  # os.path.split, in one C call
        folder = folder or sep  # "/name": the root (os.path.split keeps it)
        base = folders.get(folder)
        if base is None:
            base = folders[folder] = os.path.abspath(folder)
        full = base + name if base.endswith("/") else f"{base}/{name}"
        text = f"{full}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        data = text.encode("utf-8", "surrogatepass")
        out.append(hashlib.blake2b(data, key=key, digest_size=16, person=b"medvae-stat").digest())
    return out


def source_prefix(source_id: str) -> bytes:
    """The 128-bit prefix of a hex source id: what a row's ``id`` is made of, and what the cache stores."""
    return bytes.fromhex(source_id[:32])


class StatCache:
    """A sorted array of ``(stat key, source-id prefix)`` pairs; see the module docstring.

    Args:
        entries: a structured array with fields ``stat`` and ``source`` (16 bytes each).
    """

    def __init__(self, entries: np.ndarray | None = None) -> None:
        a = np.zeros(0, _DTYPE) if entries is None else np.asarray(entries, dtype=_DTYPE)
        # Sorted and unique by stat key (the newest entry of a key wins) for binary search.
        a = a[::-1]
        _, first = np.unique(a["stat"], return_index=True)
        self._a = a[first]

    def __len__(self) -> int:
        return int(self._a.size)

    def lookup(self, stat_keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The source-id prefix recorded for each stat key.

        Returns:
            ``(found, prefixes)``: a bool mask, and an ``S16`` array (zeros where nothing was found).
            Kept as numpy bytes: converting ``S16`` back to Python strips trailing NUL bytes.
        """
        q = np.array(stat_keys, dtype="S16")
        if not q.size or not self._a.size:
            return np.zeros(q.size, dtype=bool), np.zeros(q.size, dtype="S16")
        j = np.minimum(np.searchsorted(self._a["stat"], q), self._a.size - 1)
        found = self._a["stat"][j] == q
        return found, np.where(found, self._a["source"][j], np.zeros(1, dtype="S16"))

    def merged(self, pairs: list[tuple[bytes, bytes]], keep: np.ndarray | None = None) -> StatCache:
        """A cache with ``pairs`` added (replacing entries of the same stat key).

        Args:
            pairs: new ``(stat key, source-id prefix)`` entries.
            keep: when given (an ``S16`` array), only entries whose source prefix is in it are kept (the
                store's content), so that entries of rows no longer in the store do not accumulate.
        """
        new = np.array(pairs, dtype=_DTYPE) if pairs else np.zeros(0, _DTYPE)
        both = np.concatenate([self._a, new])  # later rows win in __init__
        if keep is not None and both.size:
            both = both[np.isin(both["source"], keep)]
        return StatCache(both)

    def to_bytes(self) -> bytes:
        """The ``.npy`` serialisation (no pickle)."""
        import io

        buf = io.BytesIO()
        np.save(buf, self._a, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StatCache:
        """Read what :meth:`to_bytes` wrote; anything unreadable is an empty cache (it is only a cache)."""
        import io

        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return cls()
        if a.dtype != _DTYPE or a.ndim != 1:
            return cls()
        return cls(a)


def cache_uri(store_uri: str) -> str:
    """Where a store's stat cache lives: ``<store>/_medvae/stat_cache.npy``."""
    from medvae.data.store import KEY_DIR

    return f"{store_uri.rstrip('/')}/{KEY_DIR}/{CACHE_FILE}"


def load(store_uri: str) -> StatCache:
    """The store's stat cache, empty when it has none or it cannot be read."""
    from medvae.data.staging import read_bytes

    try:
        return StatCache.from_bytes(read_bytes(cache_uri(store_uri)))
    except OSError:  # FileNotFoundError included: no cache yet
        return StatCache()


def save(store_uri: str, cache: StatCache) -> None:
    """Replace the store's stat cache atomically; a failure only costs the next ingest some hashing."""
    from medvae.data.staging import write_bytes

    try:
        write_bytes(cache_uri(store_uri), cache.to_bytes())
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "could not update the stat cache of %s (%s); the next ingest hashes its files again",
            store_uri,
            exc.strerror or exc,
        )
