"""One reconciler at a time: an exclusive ``flock`` on ``<state>/lock`` holding the owner's pid.

Edge module. The kernel drops a flock when its holder dies, so a lock left by a killed process
is taken over without any stale-file logic; the pid written inside is only for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from reconciler.core.errors import LockHeldError, TransientError

__all__ = ["state_lock"]


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def state_lock(path: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the lock for the block; wait up to ``wait_s`` seconds, else ``LockHeldError``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only or missing state folder: one line, not a traceback
        raise TransientError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeldError(_holder(fd)) from None
                time.sleep(0.1)
        # The pid is only for the message of the next process that finds the lock held: a
        # full disk must not stop the agent from running (it may be what frees space).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
