"""The content-addressed blob folder, ``models/blobs/sha256/<hex>``: one read-only file per
digest, verified before it got its name.

Where it sits: between the downloads and the trees. ``fetcher`` hands each verified partial
download to ``adopt``; ``trees`` links blobs into installed trees once ``is_verified`` says
they are sound; ``audit`` hashes them all again with ``verify``.

Cheap no-op: a blob whose ``lstat`` shows the (size, mtime_ns, inode) the index recorded when
it was verified is trusted without being opened. Anything whose stat differs is hashed again,
and a blob whose bytes are wrong is deleted, so that the next fetch downloads it again.
``files_hashed`` and ``bytes_hashed`` count what this folder read to hash.

What it may not do: download anything, or give a blob its name before its bytes matched the
digest (``adopt`` is only handed files ``download`` verified).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.models.index import BlobRecord, Index
from reconciler.models.layout import StoreLayout, blob_hex, is_blob_name, unique_files

__all__ = ["HASH_CHUNK", "BlobFolder", "file_entries"]

_log = logging.getLogger("reconciler.modelstore")

HASH_CHUNK = 1024 * 1024  # bytes read per call when re-hashing a file on disk


class BlobFolder:
    """The blobs of one store, and what hashing them has cost."""

    def __init__(self, layout: StoreLayout, index: Index) -> None:
        self.dir = layout.blob_dir
        self._index = index
        self.files_hashed = 0  # files opened and hashed by this store (not downloads)
        self.bytes_hashed = 0

    def missing(self, models: Iterable[ModelSpec]) -> list[ModelFile]:
        """Files to download for ``models``, one per digest, in snapshot order. Contacts
        nothing; hashes only blobs whose stat differs from what was verified."""
        with self._index.saving_on_return():
            return [file for file in unique_files(models) if not self.is_verified(file.digest)]

    def is_verified(self, digest: str) -> bool:
        """True if the blob exists and is verified; a blob whose stat changed is hashed
        again, and deleted if its bytes are wrong. Run inside ``Index.saving_on_return``."""
        hex_ = blob_hex(digest)
        blob = self.dir / hex_
        try:
            st = blob.lstat()
        except FileNotFoundError:
            return False
        index = self._index
        record = index.contents().blobs.get(hex_)
        if record is not None and record.matches(st):
            return True
        with index.lock:
            problem = self.verify(blob, {}, set())
            if problem is None:
                index.note_change()
                return True
            _log.warning("model blob %s is damaged (%s); deleting it", blob, problem)
            with contextlib.suppress(FileNotFoundError):
                blob.unlink()
            index.contents().blobs.pop(hex_, None)
            index.save()
            return False

    def verify(self, blob: Path, good_inodes: dict[int, str], bad_inodes: set[int]) -> str | None:
        """Hash one blob; record it in the index if good. The problem, or None.

        ``good_inodes`` and ``bad_inodes`` collect what was learnt, so that a tree file that
        links the same inode need not be hashed twice."""
        if not is_blob_name(blob.name):
            return "not a blob name (sha256 hex)"
        try:
            st = blob.lstat()
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file"
            got = self.hash_file(blob)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if got != blob.name:
            bad_inodes.add(st.st_ino)
            return f"digest mismatch (sha256:{got[:16]}…)"
        good_inodes[st.st_ino] = blob.name
        self._index.contents().blobs[blob.name] = BlobRecord.now(st)
        return None

    def hash_file(self, path: Path) -> str:
        """The SHA-256 hex digest of a file's bytes, counted in ``files_hashed``."""
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        total = 0
        with path.open("rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
                total += count
        with self._index.lock:
            self.files_hashed += 1
            self.bytes_hashed += total
        return digest.hexdigest()

    def adopt(self, partial: Path, hex_: str, *, synced: bool = True) -> None:
        """Give a verified partial file its final blob name, and remember it as verified.
        ``synced`` False: its bytes are not on disk yet; the index syncs them (with every
        other such blob, at once) before it saves a record of it."""
        partial.chmod(0o444)
        blob = self.dir / hex_
        os.replace(partial, blob)  # the directory is synced before the index records it
        st = blob.lstat()
        index = self._index
        with index.lock:
            if not synced:
                index.note_unsynced()
            contents = index.contents()
            contents.blobs[hex_] = BlobRecord.now(st)
            contents.failures.pop(hex_, None)
        index.note_change()  # outside the lock: a save it starts blocks no other download


def file_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not directories; none if it does not exist."""
    try:
        return [Path(e.path) for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
