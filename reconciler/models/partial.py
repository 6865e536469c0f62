"""A partial file filled by segments at their offsets: the file, the SHA-256 of its
contiguous prefix as it grows, and the crash-safe record of which bytes it already holds.

Where it sits: under the segmented download (``reconciler.models.segmented``), in
``work/models/partial/``: ``<hex>`` is the partial file, ``<hex>.parts`` its record.

* ``PrefixHash`` hashes the file front to back while segments land anywhere in it. Bytes
  written at the end of the hashed prefix are hashed from memory by the thread that wrote
  them; bytes that arrived out of order are only written, and are read back and hashed by the
  hash's own thread once the prefix reaches them. So memory stays bounded whatever the file
  size, and when segments complete roughly in order the digest is known right after the last
  byte, with no second pass over the file.
* ``PartsRecord`` is the record. It names two sets of ranges: ``durable``, written before
  the last ``fdatasync`` of the partial (true after a power loss), and ``written``, written to
  the page cache (true after the process is killed, while the machine keeps running). The
  record carries the kernel's boot id: after a reboot only ``durable`` is trusted. It is
  replaced by rename, so a reader sees the old record or the new one.

What it may not do: contact anything, decide which bytes to fetch, or vouch for bytes the
caller did not report as written (and, with per-chunk digests, verified).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.models.ranges import ByteRanges

__all__ = ["PartsRecord", "PrefixHash", "boot_id", "pwrite_all", "record_path"]

RECORD_FORMAT = 1
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def record_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".parts")


def boot_id() -> str:
    """This boot's id: page-cache contents survive a killed process, not a reboot."""
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return ""  # unknown: only durable ranges are ever trusted


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count


@dataclass(frozen=True, kw_only=True)
class PartsRecord:
    """What ``<hex>.parts`` says about ``<hex>``."""

    size: int
    digest: str
    chunk_bytes: int | None
    boot: str
    written: tuple[tuple[int, int], ...]
    durable: tuple[tuple[int, int], ...]

    def trusted(self, *, size: int, digest: str, chunk_bytes: int | None) -> ByteRanges | None:
        """The ranges that may be kept for this download, or None if the record is of
        another file (other size, digest or chunking)."""
        if (self.size, self.digest, self.chunk_bytes) != (size, digest, chunk_bytes):
            return None
        same_boot = bool(self.boot) and self.boot == boot_id()
        kept = ByteRanges(self.written if same_boot else self.durable)
        kept.remove(size, max(size, max((e for _, e in kept), default=size)))
        return kept

    @classmethod
    def load(cls, path: Path) -> PartsRecord | None:
        try:
            raw: Any = json.loads(path.read_bytes())
            if raw.get("format") != RECORD_FORMAT:
                return None
            return cls(
                size=int(raw["size"]),
                digest=str(raw["digest"]),
                chunk_bytes=None if raw["chunk_bytes"] is None else int(raw["chunk_bytes"]),
                boot=str(raw["boot"]),
                written=_pairs(raw["written"]),
                durable=_pairs(raw["durable"]),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def save(self, path: Path, *, durable: bool) -> None:
        """Replace the record; with ``durable``, fsync it (and its folder) too."""
        data = json.dumps(
            {
                "format": RECORD_FORMAT,
                "size": self.size,
                "digest": self.digest,
                "chunk_bytes": self.chunk_bytes,
                "boot": self.boot,
                "written": [list(p) for p in self.written],
                "durable": [list(p) for p in self.durable],
            }
        ).encode()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, data, 0)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def _pairs(raw: Any) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(s), int(e)) for s, e in raw)
    if any(s < 0 or e < s for s, e in pairs):
        raise ValueError("bad range")
    return pairs


class PrefixHash:
    """SHA-256 of a file's bytes from offset 0, fed by writers at any offset (see the module
    docstring). ``done`` holds every range reported, hashed or not."""

    def __init__(self, fd: int, *, size: int, read_bytes: int, kept: ByteRanges) -> None:
        self._fd = fd
        self._size = size
        self._read_bytes = read_bytes
        self._hash = hashlib.sha256()
        self._pos = 0  # bytes hashed: always a prefix of ``done``
        self._busy = False  # someone is hashing outside the lock
        self._closed = False
        self._error: OSError | None = None
        self.done = kept.copy()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._catch_up, name="prefix-hash", daemon=True)
        self._thread.start()

    @property
    def hashed(self) -> int:
        with self._cond:
            return self._pos

    def wrote(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        """``length`` bytes at ``offset`` are in the file; ``data`` is them, if at hand."""
        with self._cond:
            self.done.add(offset, offset + length)
            inline = data is not None and offset == self._pos and not self._busy
            if inline:
                self._busy = True
            else:
                self._cond.notify_all()
                return
        assert data is not None
        self._hash.update(data)  # releases the GIL: other connections keep receiving
        with self._cond:
            self._pos += length
            self._busy = False
            self._cond.notify_all()

    def done_ranges(self) -> ByteRanges:
        """A copy of every range reported so far (hashed or waiting to be)."""
        with self._cond:
            return self.done.copy()

    def wait_complete(self, timeout_s: float) -> bool:
        """True once every byte of the file is hashed."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._pos >= self._size or self._error is not None, timeout=timeout_s
            )
            if self._error is not None:
                raise self._error
            return self._pos >= self._size

    def hexdigest(self) -> str:
        with self._cond:
            return self._hash.hexdigest()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _next_read(self) -> tuple[int, int] | None:
        """Under the lock: the out-of-order bytes to read back next, or None to wait."""
        if self._busy or self._error is not None:
            return None
        end = self.done.contiguous_end(self._pos)
        if end <= self._pos:
            return None
        return self._pos, min(end, self._pos + self._read_bytes)

    def _catch_up(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._next_read() is not None)
                step = self._next_read()
                if step is None:
                    return  # closed
                self._busy = True
            start, end = step
            try:
                data = os.pread(self._fd, end - start, start)
                if len(data) != end - start:
                    raise OSError(f"partial file shorter than recorded at byte {start}")
                self._hash.update(data)
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._pos = end
                self._busy = False
                self._cond.notify_all()


def discard(partial: Path) -> None:
    """Delete a partial file and its record."""
    for path in (partial, record_path(partial)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
