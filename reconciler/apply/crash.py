"""The crash test seam: the agent SIGKILLs itself at a named step boundary when asked to.

Where it sits: the transaction calls its ``CrashSeam`` (``die_at`` in production) at each
boundary of docs/apply-order.md. ``RECONCILER_TEST_DIE_AT=<point>`` (one of ``CRASH_POINTS``)
is a test seam for tests/test_crash.py, not a setting: unset, this does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["CRASH_POINTS", "die_at"]

log = logging.getLogger("reconciler")

CRASH_POINTS = (
    "after-pre-apply",
    "after-models",
    "after-images",
    "after-runtime-files",
    "mid-containers",
    "after-containers",
    "after-prune",
    "before-receipt",
)
_CRASH_ENV = "RECONCILER_TEST_DIE_AT"


def die_at(point: str) -> None:
    """Die here, as a power cut would, when tests/test_crash.py asks for it; otherwise nothing.

    SIGKILL runs no cleanup, so what the next pass finds is what a real crash leaves.
    """
    if os.environ.get(_CRASH_ENV) == point:
        log.warning("%s=%s: killing this process", _CRASH_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)
