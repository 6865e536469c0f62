"""When ``reconcile watch`` next fetches, re-verifies and wakes: the loop's timing, as arithmetic.

Pure: the caller passes the time (``time.monotonic()`` seconds) and the random source; nothing
here reads a clock, sleeps or touches a file. ``agent.loop`` reads HEAD's ``ttl``, turns it into
a ``Timing``, and after each cycle asks the ``Schedule`` for the next one and for how long to
sleep. Jitter spreads the polls of many nodes, so that an origin does not see them in step.

A node whose snapshot waits for its rollout wave (docs/contract.md §8) fetches when that wave
opens rather than a whole poll interval later: ``wake_for_wave`` brings the next fetch
forward to the wave's time plus a small jitter, never before it. The jitter spreads the
nodes of one wave over up to ``WAVE_JITTER_MAX_S`` (or a tenth of the poll interval, if that
is less), so the origin and the registries and mirrors they then pull from are not hit by
the whole wave in the same second.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from reconciler.core.documents import Ttl

__all__ = [
    "WAVE_JITTER_FRACTION",
    "WAVE_JITTER_MAX_S",
    "Due",
    "RandomSource",
    "Schedule",
    "Timing",
    "backoff",
    "jittered",
    "timing_of",
    "wave_jitter",
]

WAVE_JITTER_MAX_S = 60.0
WAVE_JITTER_FRACTION = 0.1  # of the poll interval


class RandomSource(Protocol):
    """What the schedule draws from (``random.Random`` is one)."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class Timing:
    """Seconds. Taken from HEAD's ``ttl`` each cycle, with these as fallbacks."""

    poll_s: float = 60.0
    retry_min_s: float = 5.0
    retry_max_s: float = 300.0
    cache_s: float = 86400.0


def timing_of(ttl: Ttl | None, *, verify_interval_s: int) -> Timing:
    """The loop's timing for HEAD's ``ttl`` (None: no HEAD yet, the fallbacks).

    ``verify_interval_s`` (a setting; 0 = unset) replaces the snapshot's ``cache_s`` as the
    interval between full model re-hashes.
    """
    if ttl is None:
        return Timing()
    return Timing(
        poll_s=ttl.poll_s,
        retry_min_s=ttl.retry_min_s,
        retry_max_s=max(ttl.retry_max_s, ttl.retry_min_s),
        cache_s=verify_interval_s or ttl.cache_s,
    )


def jittered(seconds: float, rng: RandomSource, spread: float = 0.1) -> float:
    """``seconds`` moved by up to ``spread`` (a fraction) either way, never below 0."""
    return max(0.0, seconds * (1 + rng.uniform(-spread, spread)))


def backoff(failures: int, timing: Timing, rng: RandomSource) -> float:
    """Exponential from retry_min_s to retry_max_s, with full jitter on the upper half."""
    ceiling = min(timing.retry_max_s, timing.retry_min_s * (2 ** max(0, failures - 1)))
    return rng.uniform(ceiling / 2, ceiling) if ceiling > timing.retry_min_s else ceiling


def wave_jitter(timing: Timing, rng: RandomSource) -> float:
    """Seconds after a wave opens that this node wakes: 0 to min(60 s, poll_s / 10)."""
    return rng.uniform(0.0, min(WAVE_JITTER_MAX_S, WAVE_JITTER_FRACTION * timing.poll_s))


@dataclass(frozen=True)
class Due:
    """What a cycle that starts now does besides converging."""

    fetch: bool
    verify: bool  # re-hash every model file in full


@dataclass(frozen=True)
class Schedule:
    """The loop's next fetch and next full re-verification (monotonic seconds)."""

    next_fetch: float
    next_verify: float
    failures: int = 0  # fetches failed in a row

    @classmethod
    def start(cls, *, now: float, timing: Timing) -> Schedule:
        """Fetch at once; the first full re-verification one ``cache_s`` from now."""
        return cls(next_fetch=0.0, next_verify=now + timing.cache_s)

    def due(self, now: float) -> Due:
        return Due(fetch=now >= self.next_fetch, verify=now >= self.next_verify)

    def fetch_now(self) -> Schedule:
        """The next cycle fetches, whatever the backoff (SIGHUP)."""
        return replace(self, next_fetch=0.0)

    def after_cycle(
        self,
        *,
        due: Due,
        started: float,
        now: float,
        fetch_failed: bool,
        timing: Timing,
        rng: RandomSource,
    ) -> Schedule:
        """The schedule after a cycle that began at ``started`` and ended at ``now``.

        A re-verification is due ``cache_s`` after the start of the one that ran; a fetch one
        jittered poll interval after the end of a good one, or a backoff after a failed one
        (the failure count grows until a fetch succeeds). A cycle that did not fetch keeps
        both the fetch time and the count.
        """
        next_verify = started + timing.cache_s if due.verify else self.next_verify
        if not due.fetch:
            return replace(self, next_verify=next_verify)
        if fetch_failed:
            failures = self.failures + 1
            wait = backoff(failures, timing, rng)
        else:
            failures = 0
            wait = jittered(timing.poll_s, rng)
        return Schedule(next_fetch=now + wait, next_verify=next_verify, failures=failures)

    def wake_for_wave(
        self, *, opens_in_s: float | None, now: float, timing: Timing, rng: RandomSource
    ) -> Schedule:
        """The next fetch no later than a jittered moment after this node's wave opens.

        ``opens_in_s``: seconds from ``now`` until the wave that lets this node in opens
        (None, or not above 0: no wave to wait for). A fetch due sooner stays as it is.
        """
        if opens_in_s is None or opens_in_s <= 0:
            return self
        wake = now + opens_in_s + wave_jitter(timing, rng)
        return replace(self, next_fetch=min(self.next_fetch, wake))

    def pause_s(self, *, now: float, timing: Timing, rng: RandomSource) -> float:
        """Seconds to sleep from ``now``: until the next fetch, but at most a jittered poll
        interval, because drift repair runs every poll interval even while fetches back off."""
        return max(0.0, min(self.next_fetch - now, jittered(timing.poll_s, rng)))
