"""``reconcile once`` and ``reconcile watch``: fetch, converge, record, sleep, repeat.

The outermost loop below the CLI. It owns the agent lock (one reconciler at a time), the
timing (poll interval with jitter, exponential backoff with jitter on errors, periodic full
model re-verification) and the signals (SIGHUP: poll now and re-read settings, keeping the old
ones if the new ones are bad; SIGTERM/SIGINT: finish the current step and exit 0). Each cycle
is ``intake.fetch`` (unless offline or backing off) followed by ``apply.converge``, which also
repairs drift; nothing here touches Podman, git or the network directly.
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from reconciler.apply.transaction import ConvergeOutcome, converge
from reconciler.config.settings import Settings
from reconciler.core.errors import OriginUnreachableError, ReconcilerError, RejectedError
from reconciler.disk.lock import state_lock
from reconciler.history.node import Node
from reconciler.intake.fetch import fetch
from reconciler.report.node_metrics import write_node_metrics

__all__ = ["OnceResult", "Timing", "run_once", "watch"]

log = logging.getLogger("reconciler")


@dataclass(frozen=True)
class OnceResult:
    exit_code: int
    converge: ConvergeOutcome | None
    fetch_error: ReconcilerError | None


def _cycle(node: Node, *, offline: bool, do_fetch: bool, full_verify: bool) -> OnceResult:
    fetch_error: ReconcilerError | None = None
    if do_fetch and not offline:
        try:
            result = fetch(node)
            log.info("fetch: %s", result.message)
        except (RejectedError, OriginUnreachableError) as exc:
            fetch_error = exc
            log.warning("fetch: %s", exc.one_line())
    outcome = converge(node, offline=offline, full_verify=full_verify)
    log_line = outcome.message
    (log.info if outcome.converged else log.error)("converge: %s", log_line)
    write_node_metrics(node, last_apply_s=outcome.duration_s)
    if not outcome.converged:
        code = 1
    elif fetch_error is not None:
        code = fetch_error.exit_code
    else:
        code = 0
    return OnceResult(exit_code=code, converge=outcome, fetch_error=fetch_error)


def run_once(node: Node, *, offline: bool, wait_s: float = 0.0) -> OnceResult:
    """One pass: fetch (unless offline), converge, metrics. Exit code per contract §6."""
    with state_lock(node.paths.lock, wait_s=wait_s):
        return _cycle(node, offline=offline, do_fetch=True, full_verify=False)


@dataclass(frozen=True)
class Timing:
    """Seconds. Taken from HEAD's ``ttl`` each cycle, with these as fallbacks."""

    poll_s: float = 60.0
    retry_min_s: float = 5.0
    retry_max_s: float = 300.0
    cache_s: float = 86400.0


def _timing(node: Node) -> Timing:
    ttl = node.head_ttl()
    if ttl is None:
        return Timing()
    return Timing(
        poll_s=ttl.poll_s,
        retry_min_s=ttl.retry_min_s,
        retry_max_s=max(ttl.retry_max_s, ttl.retry_min_s),
        cache_s=node.settings.verify_interval_s or ttl.cache_s,
    )


def jittered(seconds: float, rng: random.Random, spread: float = 0.1) -> float:
    return max(0.0, seconds * (1 + rng.uniform(-spread, spread)))


def backoff(failures: int, timing: Timing, rng: random.Random) -> float:
    """Exponential from retry_min_s to retry_max_s, with full jitter on the upper half."""
    ceiling = min(timing.retry_max_s, timing.retry_min_s * (2 ** max(0, failures - 1)))
    return rng.uniform(ceiling / 2, ceiling) if ceiling > timing.retry_min_s else ceiling


def watch(
    load_settings: Callable[[], Settings],
    *,
    wait_s: float = 0.0,
    max_cycles: int | None = None,
    rng: random.Random | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (exit 0). ``max_cycles`` bounds a run for tests and benchmarks."""
    rng = rng or random.Random()
    stop = threading.Event()
    wake = threading.Event()
    reload_requested = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_requested.set()
        wake.set()

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, on_term),
            (signal.SIGINT, on_term),
            (signal.SIGHUP, on_hup),
        )
    }
    settings = load_settings()
    node = Node(settings)
    try:
        # watch.lock is held for life (one watch per node); the agent lock only per cycle, so
        # an operator's `once`, `rollback` or `resume` can run between two cycles.
        with state_lock(node.paths.state_dir / "watch.lock", wait_s=wait_s):
            log.info("watch: started")
            failures = 0
            next_fetch = 0.0
            next_verify = time.monotonic() + _timing(node).cache_s
            cycles = 0
            while not stop.is_set():
                if reload_requested.is_set():
                    reload_requested.clear()
                    next_fetch = 0.0
                    try:
                        node = Node(load_settings())
                        log.info("watch: settings re-read")
                    except ReconcilerError as exc:
                        log.error("watch: keeping the old settings: %s", exc.one_line())
                now = time.monotonic()
                do_fetch = now >= next_fetch
                full_verify = now >= next_verify
                try:
                    with state_lock(node.paths.lock, wait_s=max(wait_s, 60.0)):
                        node.reload()
                        result = _cycle(
                            node, offline=False, do_fetch=do_fetch, full_verify=full_verify
                        )
                except ReconcilerError as exc:
                    log.error("watch: %s", exc.one_line())
                    result = OnceResult(exit_code=1, converge=None, fetch_error=exc)
                timing = _timing(node)
                if full_verify:
                    next_verify = now + timing.cache_s
                if do_fetch:
                    if result.fetch_error is not None:
                        failures += 1
                        next_fetch = time.monotonic() + backoff(failures, timing, rng)
                    else:
                        failures = 0
                        next_fetch = time.monotonic() + jittered(timing.poll_s, rng)
                cycles += 1
                if max_cycles is not None and cycles >= max_cycles:
                    break
                # An error raised through an edge (Podman, httpx) keeps its traceback, and the
                # frames in it keep the connection they used: a reference cycle that Python
                # frees only at a full collection, rare in a loop that allocates little. One
                # per cycle, while idle, so no socket or memory outlives the pass that used it.
                gc.collect()
                # Drift repair runs every poll interval even while fetches back off.
                pause = max(0.0, min(next_fetch - time.monotonic(), jittered(timing.poll_s, rng)))
                wake.wait(pause)
                wake.clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("watch: stopped")
    return 0
