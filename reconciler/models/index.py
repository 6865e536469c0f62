"""The model store's memory: which blobs were verified, the last fetch failures, what each
installed tree holds; kept in ``models/.index.json`` and saved in batches.

Where it sits: under every other part of the model store. ``blobs`` records a blob here once
its bytes matched its digest, ``trees`` trusts a tree file whose ``lstat`` matches the record
(the cheap no-op: no blob opened), ``fetcher`` notes failures, ``retention`` and ``audit``
forget what is gone or bad.

Saves are batched: newly verified blobs and fetch failures reach the file at most once a
second while a call records many, and always before that call returns (``saving_on_return``);
every other change (an install, a removal, a damaged blob forgotten) is saved at once. The
blob folder is fsynced before each save, so the file never records a blob a power cut could
take back. Losing unsaved records to a crash costs a re-hash of those blobs on the next
pass, never a wrong answer.

What it may not do: read or hash a blob, or decide what is trusted: an unreadable index is
treated as empty (everything gets hashed again). It writes only ``.index.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.core.documents import format_time
from reconciler.disk.atomic import fsync_dir, write_atomic
from reconciler.models.layout import StoreLayout

__all__ = [
    "INDEX_FORMAT",
    "INDEX_SAVE_EVERY_S",
    "BlobRecord",
    "FetchFailure",
    "Index",
    "IndexContents",
    "sync_filesystem",
]

_log = logging.getLogger("reconciler.modelstore")

INDEX_FORMAT = 1
# Newly verified blobs are written to the index at most this often (and always when the call
# that verified them returns): saving after every blob made an install of N small files cost
# N saves of an index of N records (bench/many_files.py: 10x the files took 33x the time).
INDEX_SAVE_EVERY_S = 1.0


@dataclass(slots=True)
class BlobRecord:
    """What a verified blob's ``lstat`` showed when it was verified."""

    size: int
    mtime_ns: int
    inode: int
    verified_at: str

    @classmethod
    def now(cls, st: os.stat_result) -> BlobRecord:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, format_time(time.time()))

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "inode": self.inode,
            "verified_at": self.verified_at,
        }

    def matches(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == self.size
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ino == self.inode
        )


@dataclass
class FetchFailure:
    kind: str  # "verification" (bytes served were wrong) or "download" (transport)
    reason: str
    at: str


class IndexContents:
    """The records of ``models/.index.json``. Format (``format`` = 1)::

        {"format": 1,
         "blobs":    {"<hex>": {"size": N, "mtime_ns": N, "inode": N, "verified_at": T}},
         "failures": {"<hex>": {"kind": "verification" | "download", "reason": S, "at": T}},
         "models":   {"<name>:<version>": {"files": {"<path>": "sha256:<hex>"},
                                           "installed_at": T}}}

    T is a contract time (``YYYY-MM-DDTHH:MM:SSZ``).
    """

    __slots__ = ("blobs", "failures", "models")

    def __init__(self) -> None:
        self.blobs: dict[str, BlobRecord] = {}
        self.failures: dict[str, FetchFailure] = {}
        self.models: dict[str, dict[str, Any]] = {}

    @classmethod
    def read(cls, path: Path) -> IndexContents:
        """The file's records; empty when it is missing or unreadable."""
        contents = cls()
        try:
            with _collector_paused():
                raw = json.loads(path.read_bytes())
                if raw.get("format") != INDEX_FORMAT:
                    raise ValueError(f"unknown format {raw.get('format')!r}")
                # Positional: a tenth of a second less per 100,000 records than ``**v``.
                contents.blobs = {
                    k: BlobRecord(v["size"], v["mtime_ns"], v["inode"], v["verified_at"])
                    for k, v in raw["blobs"].items()
                }
                contents.failures = {k: FetchFailure(**v) for k, v in raw["failures"].items()}
                contents.models = dict(raw["models"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            _log.warning(
                "ignoring unreadable model index %s (%s); files will be re-hashed", path, exc
            )
            contents = cls()
        return contents

    def encode(self) -> bytes:
        data = {
            "format": INDEX_FORMAT,
            "blobs": {k: v.as_json() for k, v in sorted(self.blobs.items())},
            "failures": {k: vars(v) for k, v in sorted(self.failures.items())},
            "models": dict(sorted(self.models.items())),
        }
        return json.dumps(data, indent=1).encode() + b"\n"


class Index:
    """The index of one store: read on first use, saved in batches (see the module docstring).

    ``lock`` guards the records and the store's counters; it is reentrant because a verify
    that records a blob runs inside calls that already hold it."""

    def __init__(self, layout: StoreLayout) -> None:
        self._layout = layout
        self.lock = threading.RLock()
        self._contents: IndexContents | None = None
        self._unsaved = False  # the records in memory hold verified blobs not yet on disk
        self._unsynced = False  # a blob was stored whose bytes may still be in the page cache
        self._saved_at = time.monotonic()
        self._saving = threading.Lock()  # one save writing at a time (see ``_save``)

    def contents(self) -> IndexContents:
        with self.lock:
            if self._contents is None:
                self._contents = IndexContents.read(self._layout.index_path)
            return self._contents

    def note_change(self) -> None:
        """Note a change that may wait for the batched save (a newly verified blob, a fetch
        failure); save if the last save is a second old. Callers run inside
        ``saving_on_return``, which saves the rest. Called without ``lock`` held, the
        save's sync and write hold up nobody."""
        self._unsaved = True
        if time.monotonic() - self._saved_at >= INDEX_SAVE_EVERY_S:
            self._save(wait=False)

    def note_unsynced(self) -> None:
        """A blob was stored without an fsync of its bytes: sync before the next save."""
        self._unsynced = True

    def save(self) -> None:
        """Write the records now (after a save under way, if any)."""
        self._save(wait=True)

    def _save(self, *, wait: bool) -> None:
        """Encode the records under ``lock``, then sync and write without it: downloads
        storing blobs meanwhile do not wait for a filesystem sync. ``_saving`` keeps the
        writes in the order of their encodings; it is only ever taken under ``lock`` and its
        holder never waits for ``lock``, so the two cannot deadlock. ``wait`` False: skip
        when a save is under way (it, or the next, takes these records)."""
        with self.lock:
            if not self._saving.acquire(blocking=wait):
                return
            try:
                encoded = self.contents().encode()
            except BaseException:
                self._saving.release()
                raise
            unsynced, self._unsynced, self._unsaved = self._unsynced, False, False
        try:
            # The blobs' bytes and new names are made durable first, so that the index
            # never records a blob a power cut could take back.
            if self._layout.blob_dir.is_dir():
                if unsynced:
                    sync_filesystem(self._layout.blob_dir)
                fsync_dir(self._layout.blob_dir)
            write_atomic(self._layout.index_path, encoded)
            self._saved_at = time.monotonic()
        except BaseException:
            self._unsaved = True  # plain assignments: no lock taken while holding _saving
            self._unsynced = self._unsynced or unsynced
            raise
        finally:
            self._saving.release()

    def save_if_store_exists(self) -> None:
        """Save, unless ``models/`` does not exist (nothing was ever stored: create nothing)."""
        if self._layout.root.is_dir():
            self.save()

    @contextlib.contextmanager
    def saving_on_return(self) -> Iterator[None]:
        try:
            yield
        finally:
            with self.lock:
                if self._unsaved:
                    self.save()


def sync_filesystem(folder: Path) -> None:
    """Flush every dirty page of the filesystem holding ``folder``: one journal commit for a
    whole batch of small blobs, where an fsync each would cost one commit per blob."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS is not None and _SYNCFS(fd) == 0:
            return
    finally:
        os.close(fd)
    os.sync()  # no syncfs(2) here: every filesystem, still one call


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_syncfs()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Build many small objects without the cyclic garbage collector running in between.

    Loading the index of a large store makes two objects per file; each collection the
    allocations trigger walks the whole growing heap, which made loading 100,000 records
    take 25 times as long as 10,000 (measured, bench/plan.py). Nothing built here forms a
    reference cycle, so pausing the collector frees nothing later than it would have.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
