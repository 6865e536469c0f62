"""The report heartbeat of ``reconcile watch`` (docs/contract.md §9): a report every
``ttl.heartbeat_s``, on a thread of its own, so a slow or dead collector never delays a cycle.

Where it sits: started by ``agent.loop.watch`` and told after each cycle which settings are
in force; it builds a fresh ``Node`` for each report (its own git handle, nothing shared with
the cycle running meanwhile) and calls ``report.sender.deliver``. After a failed report it
waits longer each time (``core.schedule.backoff``, from ``heartbeat_s`` up to
``_BACKOFF_MAX_S``). It reads and writes no node state besides what ``deliver`` records.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from reconciler.config.settings import Settings
from reconciler.core.errors import ReconcilerError
from reconciler.core.schedule import Timing, backoff
from reconciler.history.node import Node
from reconciler.report.sender import deliver

__all__ = ["DEFAULT_HEARTBEAT_S", "Heartbeat", "report_now"]

log = logging.getLogger("reconciler")

DEFAULT_HEARTBEAT_S = 30  # before the first snapshot, which carries ttl.heartbeat_s
_BACKOFF_MAX_S = 900.0  # a node whose collector is down still tries every 15 minutes
_CLOSE_WAIT_S = 2.0  # at exit, a report in flight may finish this long; then it is dropped


def report_now(node: Node) -> bool:
    """One report (at the end of ``once``); whether one was sent and accepted."""
    try:
        delivery = deliver(node)
    except ReconcilerError as exc:
        log.warning("report: %s", exc.one_line())
        return False
    return delivery is not None and delivery.ok


class Heartbeat:
    """A daemon thread sending a report after the first cycle and then every heartbeat."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._settings: Settings | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cycle_done(self, settings: Settings) -> None:
        """A cycle finished under these settings; the first call starts the reports."""
        with self._lock:
            self._settings = settings
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="report", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop; a report in flight gets ``_CLOSE_WAIT_S`` to finish, then is abandoned (the
        thread is a daemon: SIGTERM must not wait for a hanging collector)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_WAIT_S)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                settings = self._settings
            assert settings is not None  # set before the thread starts
            ok, heartbeat_s = self._send(settings)
            failures = 0 if ok else failures + 1
            pause = float(heartbeat_s)
            if failures:
                limits = Timing(retry_min_s=heartbeat_s, retry_max_s=_BACKOFF_MAX_S)
                pause = max(pause, backoff(failures, limits, self._rng))
            self._wake.wait(pause)

    def _send(self, settings: Settings) -> tuple[bool, int]:
        """One report; (sent and accepted, or no URL; heartbeat_s of HEAD's snapshot)."""
        started = time.monotonic()
        try:
            node = Node(settings)
            ttl = node.head_ttl()
            heartbeat_s = ttl.heartbeat_s if ttl is not None else DEFAULT_HEARTBEAT_S
            delivery = deliver(node)
        except Exception as exc:  # a fault in reporting must never stop the agent
            log.error("report: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return False, DEFAULT_HEARTBEAT_S
        log.debug("report: took %.3f s", time.monotonic() - started)
        return delivery is None or delivery.ok, heartbeat_s
