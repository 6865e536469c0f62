"""``reconcile once`` and ``reconcile watch``: fetch, converge, record, sleep, repeat.

The outermost loop below the CLI. It owns the agent lock (one reconciler at a time), the
clock (it reads ``time.monotonic`` and sleeps; the arithmetic of poll interval with jitter,
exponential backoff with jitter on errors and periodic full model re-verification is
``core.schedule``) and the signals (SIGHUP: poll now and re-read settings, keeping the old ones
if the new ones are bad; SIGTERM/SIGINT: finish the current step and exit 0). Each cycle is
``intake.fetch`` (unless offline or backing off), ``intake.enter_wave`` (a rollout wave that
opened since: no network needed) and ``apply.converge``, which also repairs drift; a snapshot
waiting for its wave wakes the loop when the wave opens (``Schedule.wake_for_wave``). Nothing
here touches Podman, git or the network directly.
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from reconciler.agent.heartbeat import Heartbeat, report_now
from reconciler.agent.seeding import seed_what_we_keep, stop_seeding
from reconciler.apply.transaction import ConvergeOutcome, converge
from reconciler.config.settings import Settings
from reconciler.core.errors import OriginUnreachableError, ReconcilerError, RejectedError
from reconciler.core.rollout import RolloutWait
from reconciler.core.schedule import Due, Schedule, Timing, timing_of
from reconciler.disk.lock import state_lock
from reconciler.history.node import Node
from reconciler.intake.fetch import enter_wave, fetch
from reconciler.report.node_metrics import write_node_metrics
from reconciler.selfupdate.gate import note_converged, switch_due

__all__ = ["OnceResult", "run_once", "watch"]

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
    entered = enter_wave(node)  # a wave opened since the last head: no network needed
    if entered is not None:
        log.info("rollout: %s", entered.message)
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
    """One pass: fetch (unless offline), converge, metrics. Exit code per docs/contract.md §6."""
    with state_lock(node.paths.lock, wait_s=wait_s):
        try:
            result = _cycle(node, offline=offline, do_fetch=True, full_verify=False)
        finally:
            stop_seeding()  # `once` shares only while it downloads
    if not offline:
        report_now(node)  # after the lock: a slow collector holds up no other command
    return result


def _timing(node: Node) -> Timing:
    return timing_of(node.head_ttl(), verify_interval_s=node.settings.verify_interval_s)


def _wave_opens_in_s(node: Node) -> float | None:
    """Seconds until the wave that lets this node take its waiting snapshot opens (wall clock)."""
    wait = RolloutWait.from_record(node.state.rollout_wait)
    found = wait.entry() if wait is not None else None
    return found.at - time.time() if found is not None else None


@dataclass(frozen=True)
class _Signals:
    """What the signal handlers tell the loop (events: set from a handler, read by the loop)."""

    stop: threading.Event  # SIGTERM, SIGINT: finish the current step and exit
    reload: threading.Event  # SIGHUP: re-read settings and poll now
    wake: threading.Event  # either: cut the pause short


@contextmanager
def _handled_signals() -> Iterator[_Signals]:
    """Install the handlers for the duration of ``watch``; the previous ones come back after."""
    signals = _Signals(stop=threading.Event(), reload=threading.Event(), wake=threading.Event())

    def on_term(signum: int, frame: FrameType | None) -> None:
        signals.stop.set()
        signals.wake.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        signals.reload.set()
        signals.wake.set()

    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, on_term),
            (signal.SIGINT, on_term),
            (signal.SIGHUP, on_hup),
        )
    }
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch(
    load_settings: Callable[[], Settings],
    *,
    wait_s: float = 0.0,
    max_cycles: int | None = None,
    rng: random.Random | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (exit 0). ``max_cycles`` bounds a run for tests and benchmarks."""
    rng = rng or random.Random()
    with _handled_signals() as signals:
        node = Node(load_settings())
        # watch.lock is held for life (one watch per node); the agent lock only per cycle, so
        # an operator's `once`, `rollback` or `resume` can run between two cycles.
        with state_lock(node.paths.state_dir / "watch.lock", wait_s=wait_s):
            log.info("watch: started")
            heartbeat = Heartbeat()
            try:
                _run(
                    node,
                    load_settings,
                    signals=signals,
                    wait_s=wait_s,
                    max_cycles=max_cycles,
                    rng=rng,
                    heartbeat=heartbeat,
                )
            finally:
                heartbeat.close()
                stop_seeding()
    log.info("watch: stopped")
    return 0


def _run(
    node: Node,
    load_settings: Callable[[], Settings],
    *,
    signals: _Signals,
    wait_s: float,
    max_cycles: int | None,
    rng: random.Random,
    heartbeat: Heartbeat,
) -> None:
    """Cycle, then sleep until the schedule or a signal says so, until stopped."""
    schedule = Schedule.start(now=time.monotonic(), timing=_timing(node))
    cycles = 0
    while not signals.stop.is_set():
        if signals.reload.is_set():
            signals.reload.clear()
            schedule = schedule.fetch_now()
            node = _reread(node, load_settings)
        started = time.monotonic()
        due = schedule.due(started)
        result = _locked_cycle(node, due=due, wait_s=wait_s)
        heartbeat.cycle_done(node.settings)  # reports go on their own thread (§9)
        seed_what_we_keep(node)  # p2p: offer HEAD's and the retained snapshots' blobs
        timing = _timing(node)
        schedule = schedule.after_cycle(
            due=due,
            started=started,
            now=time.monotonic(),
            fetch_failed=result.fetch_error is not None,
            timing=timing,
            rng=rng,
        )
        schedule = schedule.wake_for_wave(
            opens_in_s=_wave_opens_in_s(node), now=time.monotonic(), timing=timing, rng=rng
        )
        cycles += 1
        if _agent_switch(node, result):
            break
        if max_cycles is not None and cycles >= max_cycles:
            break
        # An error raised through an edge (Podman, httpx) keeps its traceback, and the
        # frames in it keep the connection they used: a reference cycle that Python
        # frees only at a full collection, rare in a loop that allocates little. One
        # per cycle, while idle, so no socket or memory outlives the pass that used it.
        gc.collect()
        signals.wake.wait(schedule.pause_s(now=time.monotonic(), timing=timing, rng=rng))
        signals.wake.clear()


def _agent_switch(node: Node, result: OnceResult) -> bool:
    """After a cycle: a release on trial that converged is good now; and whether another
    agent release was selected, so that this one exits and the supervisor starts it (§10)."""
    if result.converge is not None and result.converge.converged:
        note_converged(node.paths.state_dir)
    why = switch_due(node.paths.state_dir)
    if why is not None:
        log.info("watch: %s; exiting so that the supervisor starts it", why)
    return why is not None


def _reread(node: Node, load_settings: Callable[[], Settings]) -> Node:
    """The node with the settings read anew; the old one if the new settings are bad."""
    try:
        fresh = Node(load_settings())
    except ReconcilerError as exc:
        log.error("watch: keeping the old settings: %s", exc.one_line())
        return node
    log.info("watch: settings re-read")
    return fresh


def _locked_cycle(node: Node, *, due: Due, wait_s: float) -> OnceResult:
    """One cycle under the agent lock; an error it raises is logged and counts as failed."""
    try:
        with state_lock(node.paths.lock, wait_s=max(wait_s, 60.0)):
            node.reload()
            return _cycle(node, offline=False, do_fetch=due.fetch, full_verify=due.verify)
    except ReconcilerError as exc:
        log.error("watch: %s", exc.one_line())
        return OnceResult(exit_code=1, converge=None, fetch_error=exc)
