"""Crash-safe file replacement: write aside, fsync, rename over, fsync the folder.

Edge module (filesystem). A reader sees the old bytes or the new ones, never a mix, even if
the process is killed or the machine loses power in between. A write that fails leaves the
old file as it was and raises one of the project's errors (``DiskSpaceError`` for a full
disk, ``TransientError`` otherwise, e.g. a read-only state folder), never a bare ``OSError``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from reconciler.core.errors import DiskSpaceError, TransientError

__all__ = ["fsync_dir", "is_disk_full", "write_atomic"]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: OSError) -> bool:
    """Whether ``exc`` means no space is left (a full disk, or the user's quota)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``; the temporary file shares the folder (same filesystem)."""
    try:
        _write_atomic(path, data, mode=mode)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskSpaceError(f"disk full while writing {path}") from exc
        raise TransientError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
