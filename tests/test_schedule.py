"""The watch loop's timing (``core.schedule``): exact values for given draws and times.

A ``Draw`` source returns a fixed point of each range it is asked for (0 = the low end, 1 = the
high end), so every delay below is an exact number; a seeded ``random.Random`` checks the
bounds of real jitter.
"""

from __future__ import annotations

import random

import pytest

from reconciler.core.documents import Ttl
from reconciler.core.schedule import Due, Schedule, Timing, backoff, jittered, timing_of


class Draw:
    """A random source that always answers the same fraction of the asked range."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return a + (b - a) * self.at


TTL = Ttl(poll_s=30, heartbeat_s=300, retry_min_s=4, retry_max_s=64, cache_s=3600)


# ---- the timing from the snapshot's ttl ---------------------------------------------------


def test_timing_comes_from_the_ttl_and_falls_back_without_a_head() -> None:
    assert timing_of(TTL, verify_interval_s=0) == Timing(
        poll_s=30, retry_min_s=4, retry_max_s=64, cache_s=3600
    )
    assert timing_of(None, verify_interval_s=0) == Timing(
        poll_s=60.0, retry_min_s=5.0, retry_max_s=300.0, cache_s=86400.0
    )


def test_the_verify_interval_setting_replaces_the_snapshots_cache_s() -> None:
    assert timing_of(TTL, verify_interval_s=900).cache_s == 900
    assert timing_of(TTL, verify_interval_s=900).poll_s == 30


def test_a_retry_max_below_retry_min_is_raised_to_it() -> None:
    odd = Ttl(poll_s=30, heartbeat_s=300, retry_min_s=20, retry_max_s=5, cache_s=3600)
    assert timing_of(odd, verify_interval_s=0).retry_max_s == 20


# ---- jitter and backoff -------------------------------------------------------------------


def test_jittered_moves_by_at_most_the_spread_either_way() -> None:
    assert jittered(60.0, Draw(0.0)) == pytest.approx(54.0)
    assert jittered(60.0, Draw(0.5)) == pytest.approx(60.0)
    assert jittered(60.0, Draw(1.0)) == pytest.approx(66.0)
    assert jittered(60.0, Draw(1.0), spread=0.5) == pytest.approx(90.0)
    draw = Draw(0.5)
    jittered(60.0, draw, spread=0.25)
    assert draw.asked == [(-0.25, 0.25)]


def test_jittered_is_never_negative() -> None:
    assert jittered(10.0, Draw(0.0), spread=2.0) == 0.0


def test_backoff_doubles_from_retry_min_to_retry_max() -> None:
    timing = Timing(retry_min_s=5, retry_max_s=300)
    highest = [backoff(n, timing, Draw(1.0)) for n in range(1, 10)]
    lowest = [backoff(n, timing, Draw(0.0)) for n in range(1, 10)]
    assert highest == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert lowest == [5, 5, 10, 20, 40, 80, 150, 150, 150]


def test_the_first_retry_waits_retry_min_without_a_draw() -> None:
    draw = Draw(0.0)
    assert backoff(1, Timing(retry_min_s=5, retry_max_s=300), draw) == 5
    assert backoff(0, Timing(retry_min_s=5, retry_max_s=300), draw) == 5
    assert draw.asked == []


def test_backoff_draws_from_the_upper_half_of_its_ceiling() -> None:
    draw = Draw(0.5)
    assert backoff(4, Timing(retry_min_s=5, retry_max_s=300), draw) == 30
    assert draw.asked == [(20, 40)]


def test_jittered_stays_within_ten_percent_and_is_reproducible_with_a_seed() -> None:
    draws = [jittered(60.0, random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng = random.Random(1)
    values = [jittered(60.0, rng) for _ in range(2000)]
    assert min(values) >= 54.0
    assert max(values) <= 66.0
    assert min(values) < 55.0 and max(values) > 65.0  # the whole ±10 % band is used
    assert jittered(0.0, rng) == 0.0


def test_backoff_grows_from_retry_min_to_retry_max() -> None:
    timing = Timing(poll_s=60, retry_min_s=5, retry_max_s=300)
    rng = random.Random(42)

    assert backoff(1, timing, rng) == 5  # the first retry waits exactly retry_min_s
    ceilings = [5 * 2 ** (n - 1) for n in range(2, 8)]  # 10, 20, … 320
    for failures, ceiling in zip(range(2, 8), ceilings, strict=True):
        for _ in range(200):
            delay = backoff(failures, timing, rng)
            top = min(ceiling, 300)
            assert top / 2 <= delay <= top, (failures, delay)
    late = [backoff(50, timing, rng) for _ in range(500)]
    assert min(late) >= 150 and max(late) <= 300
    assert backoff(3, timing, random.Random(9)) == backoff(3, timing, random.Random(9))


def test_backoff_with_equal_bounds_is_constant() -> None:
    timing = Timing(retry_min_s=2, retry_max_s=2)
    assert {backoff(n, timing, random.Random(n)) for n in range(1, 10)} == {2}


# ---- the schedule of fetches, re-verifications and pauses ---------------------------------

POLL = Timing(poll_s=60, retry_min_s=5, retry_max_s=40, cache_s=3600)


def test_a_new_schedule_fetches_at_once_and_verifies_after_cache_s() -> None:
    schedule = Schedule.start(now=1000.0, timing=POLL)
    assert schedule == Schedule(next_fetch=0.0, next_verify=4600.0, failures=0)
    assert schedule.due(1000.0) == Due(fetch=True, verify=False)
    assert schedule.due(4600.0) == Due(fetch=True, verify=True)


def test_after_a_good_fetch_the_next_is_one_jittered_poll_after_the_cycle_ended() -> None:
    schedule = Schedule(next_fetch=0.0, next_verify=4600.0, failures=3)
    after = schedule.after_cycle(
        due=Due(fetch=True, verify=False),
        started=1000.0,
        now=1002.0,
        fetch_failed=False,
        timing=POLL,
        rng=Draw(1.0),
    )
    assert after.next_fetch == pytest.approx(1002.0 + 66.0)
    assert after.next_verify == 4600.0
    assert after.failures == 0
    assert not after.due(1067.0).fetch and after.due(1068.0).fetch


def test_failed_fetches_back_off_until_the_cap_and_a_good_one_resets() -> None:
    schedule = Schedule.start(now=0.0, timing=POLL)
    waits = []
    for end in (10.0, 20.0, 30.0, 40.0, 50.0, 60.0):
        schedule = schedule.after_cycle(
            due=Due(fetch=True, verify=False),
            started=end - 1,
            now=end,
            fetch_failed=True,
            timing=POLL,
            rng=Draw(1.0),
        )
        waits.append(schedule.next_fetch - end)
    assert waits == [5, 10, 20, 40, 40, 40]
    assert schedule.failures == 6
    schedule = schedule.after_cycle(
        due=Due(fetch=True, verify=False),
        started=99.0,
        now=100.0,
        fetch_failed=False,
        timing=POLL,
        rng=Draw(0.0),
    )
    assert schedule.failures == 0
    assert schedule.next_fetch == pytest.approx(154.0)


def test_a_cycle_that_did_not_fetch_keeps_the_fetch_time_and_the_failures() -> None:
    schedule = Schedule(next_fetch=500.0, next_verify=4600.0, failures=2)
    draw = Draw(0.5)
    after = schedule.after_cycle(
        due=Due(fetch=False, verify=False),
        started=100.0,
        now=101.0,
        fetch_failed=True,
        timing=POLL,
        rng=draw,
    )
    assert after == schedule
    assert draw.asked == []


def test_a_re_verification_is_next_due_cache_s_after_the_start_of_the_last() -> None:
    schedule = Schedule(next_fetch=500.0, next_verify=100.0, failures=0)
    after = schedule.after_cycle(
        due=Due(fetch=False, verify=True),
        started=100.0,
        now=400.0,
        fetch_failed=False,
        timing=POLL,
        rng=Draw(0.5),
    )
    assert after == Schedule(next_fetch=500.0, next_verify=3700.0, failures=0)


def test_fetch_now_makes_the_next_cycle_fetch_and_keeps_the_failures() -> None:
    schedule = Schedule(next_fetch=900.0, next_verify=4600.0, failures=4)
    assert schedule.fetch_now() == Schedule(next_fetch=0.0, next_verify=4600.0, failures=4)
    assert schedule.fetch_now().due(1.0).fetch


def test_the_pause_lasts_until_the_next_fetch_but_at_most_one_poll_interval() -> None:
    soon = Schedule(next_fetch=130.0, next_verify=4600.0)
    assert soon.pause_s(now=100.0, timing=POLL, rng=Draw(0.5)) == pytest.approx(30.0)
    far = Schedule(next_fetch=1000.0, next_verify=4600.0)
    assert far.pause_s(now=100.0, timing=POLL, rng=Draw(0.0)) == pytest.approx(54.0)
    assert far.pause_s(now=100.0, timing=POLL, rng=Draw(1.0)) == pytest.approx(66.0)
    late = Schedule(next_fetch=50.0, next_verify=4600.0)
    assert late.pause_s(now=100.0, timing=POLL, rng=Draw(0.5)) == 0.0


def test_a_seeded_source_gives_the_same_schedule_twice() -> None:
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        schedule = Schedule.start(now=0.0, timing=POLL)
        pauses = []
        for n in range(20):
            schedule = schedule.after_cycle(
                due=schedule.due(float(n)),
                started=float(n),
                now=float(n),
                fetch_failed=n % 3 == 0,
                timing=POLL,
                rng=rng,
            )
            pauses.append(schedule.pause_s(now=float(n), timing=POLL, rng=rng))
        return pauses

    assert run(5) == run(5)
    assert run(5) != run(6)
