"""Staged rollouts on the node (docs/contract.md §8, phase 2): waiting for the wave, entering it.

Real git repositories, real signed heads from the ``RepositorySimulator`` served over loopback
HTTP, real node keys. Each node's key is derived from its name (``named_key``) and written
before ``reconcile init``, so its position is known in advance; the tests compute positions
with their own copy of the formula. A fetch runs in-process with the ``now`` it is given, so a
wave hours away is reached without waiting; the ``watch`` test runs the real command under
``faketime`` instead. The tests marked ``podman`` converge through the private Podman service.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config.settings import load_settings
from reconciler.core import record
from reconciler.core.documents import parse_time
from reconciler.core.errors import OriginUnreachableError
from reconciler.core.rollout import Position, Rollout, RolloutWait, Wave, admits
from reconciler.core.schedule import Schedule, Timing, wave_jitter
from reconciler.history.node import Node
from reconciler.intake.fetch import FetchResult, enter_wave, fetch
from reconciler.report.node_metrics import node_metrics
from reconciler.report.status import format_status, status_report
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import (
    AGENT_COMMAND,
    converged,
    head,
    node_env,
    once,
    receipts,
    snapshot_body,
)
from tests.support.signing import Release, RepositorySimulator, format_time, named_key

SALT = "fleet"
HOUR = 3600
REJECTED = 4


def formula(salt: str, public: bytes) -> int:
    """docs/contract.md §8, written out: hundredths of a percent, 0..9999."""
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + public).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def place(name: str, salt: str = SALT) -> int:
    return formula(salt, bytes(named_key(name).verify_key))


def shown(hundredths: int) -> str:
    return f"{hundredths // 100}.{hundredths % 100:02d}"


# ---- nodes and fetches ------------------------------------------------------------------------


@pytest.fixture
def now(simulator: RepositorySimulator) -> int:
    """The network's clock, in whole seconds (waves are whole seconds)."""
    return int(simulator.now)


@pytest.fixture
def keyed(
    tmp_path: Path,
    file_server: FileServer,
    simulator: RepositorySimulator,
    _clean_environment: None,
) -> Callable[..., NodeUnderTest]:
    """``keyed(name)``: a node whose Ed25519 key is ``named_key(name)``, initialised."""

    def make(name: str, *, origin: str | None = None, root: bytes | None = None) -> NodeUnderTest:
        node = NodeUnderTest(tmp_path / name)
        node.state_dir.mkdir(parents=True)
        key = named_key(name)
        private = node.state_dir / "node.key"
        private.write_text(bytes(key).hex() + "\n", encoding="ascii")
        private.chmod(0o600)
        public = bytes(key.verify_key).hex()
        (node.state_dir / "node.pub").write_text(public + "\n", encoding="ascii")
        node.init(origin or file_server.url, root or simulator.roots[1]).ok()
        return node

    return make


def opened(node: NodeUnderTest) -> Node:
    """The node as the agent opens it (its settings file and environment)."""
    return Node(load_settings(config=str(node.config), environ=node.env))


def fetch_at(node: NodeUnderTest, when: float) -> FetchResult:
    return fetch(opened(node), now=when)


def status_at(node: NodeUnderTest, when: float) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(json.dumps(status_report(opened(node), now=when)))
    return report


def main_of(node: NodeUnderTest) -> str:
    return node.git("rev-parse", "main").strip()


def serials_on_main(node: NodeUnderTest) -> list[str]:
    return node.git("log", "--format=%(trailers:key=Serial,valueonly)", "main").split()


def rollout_of(now: int, *waves: tuple[int, int], salt: str | None = SALT) -> dict[str, Any]:
    """A head's ``rollout``: waves as (seconds from ``now``, percent)."""
    body: dict[str, Any] = {
        "waves": [{"at": format_time(now + offset), "percent": p} for offset, p in waves]
    }
    if salt is not None:
        body["salt"] = salt
    return body


def publish(
    simulator: RepositorySimulator,
    serial: int,
    rollout: dict[str, Any] | None = None,
) -> Release:
    """Snapshot ``serial`` (its own contents) with a head carrying ``rollout``."""

    def edit(head_payload: dict[str, Any]) -> None:
        if rollout is not None:
            head_payload["rollout"] = rollout

    return simulator.publish(
        serial,
        body=snapshot_body(),  # no models, no runtimes: converging needs nothing served
        mutate_snapshot=lambda s: s["jobs"].update(max_queue=serial),
        mutate_head=edit,
    )


@pytest.fixture
def on_first(simulator: RepositorySimulator, now: int) -> Callable[[NodeUnderTest], Release]:
    """``on_first(node)``: serial 1 (no rollout) published and at the node's HEAD."""
    state: dict[str, Release] = {}

    def take(node: NodeUnderTest) -> Release:
        if "first" not in state:
            state["first"] = publish(simulator, 1)
        assert fetch_at(node, now).status == "new"
        return state["first"]

    return take


# ---- outside the wave, then in ----------------------------------------------------------------


def test_a_node_outside_the_wave_stores_keeps_head_raises_the_floor_and_enters_on_time(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("solo")
    at = place("solo")  # 59.59 %
    on_first(node)
    one = main_of(node)
    below, above = at // 100, at // 100 + 1
    second = publish(simulator, 2, rollout_of(now, (-HOUR, below), (HOUR, above), (2 * HOUR, 100)))

    waiting = fetch_at(node, now)

    phrase = (
        f"rollout {below} % now, this node at {shown(at)} %, "
        f"enters at {format_time(now + HOUR)} (wave 2)"
    )
    assert waiting.status == "waiting"
    assert waiting.message == f"snapshot 2 ({second.digest}) stored, waiting: {phrase}"
    refs = node.refs()
    assert refs["refs/heads/main"] == one
    assert refs[f"refs/snapshots/{second.hex}"] == refs["refs/reconciler/accepted"] != one
    report = status_at(node, now)
    assert report["head"]["serial"] == 1
    assert report["last_accepted"]["serial"] == 2  # the floor rose, whatever the wave
    assert report["waiting"] == [
        {
            "digest": second.digest,
            "serial": 2,
            "rollout": {
                "position": shown(at),
                "position_hundredths": at,
                "percent_now": below,
                "wave": 2,
                "enters_at": format_time(now + HOUR),
                "in": False,
                "summary": phrase,
            },
        }
    ]
    assert f"waiting     serial 2  {second.digest} — {phrase}" in format_status(report)

    # A second before the wave: the same head (a 304), still out.
    assert fetch_at(node, now + HOUR - 1).message == "head.json not modified"
    assert main_of(node) == one

    entered = fetch_at(node, now + HOUR)

    assert entered.status == "new"
    assert entered.message == (
        f"snapshot 2 ({second.digest}) is the new HEAD (rollout wave 2, this node at {shown(at)} %)"
    )
    trailers = head(node)
    assert trailers["Serial"] == "2"
    assert trailers["Reason"] == "fetch"
    assert trailers["Rollout-Wave"] == "2"
    assert trailers["Rollout-Wave-At"] == format_time(now + HOUR)
    assert trailers["Rollout-Position"] == shown(at)
    after = status_at(node, now + HOUR)
    assert after["waiting"] == []
    assert after["rollout_entered"] == {
        "digest": second.digest,
        "serial": 2,
        "wave": 2,
        "wave_at": format_time(now + HOUR),
        "position": shown(at),
        "at": format_time(now + HOUR),
    }
    assert f"wave 2 at {shown(at)} %" in node.run("log", "-n", "1").ok().stdout


def test_the_wave_opens_without_the_origin_while_the_head_is_unexpired(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    file_server: FileServer,
    now: int,
) -> None:
    node = keyed("solo")
    on_first(node)
    one = main_of(node)
    second = publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"
    file_server.faults.set("/head.json", status=500)

    with pytest.raises(OriginUnreachableError):
        fetch_at(node, now + HOUR)

    assert main_of(node) == one
    assert enter_wave(opened(node), now=now + HOUR - 1) is None
    expires = parse_time(node.record()["last_head_expires"])
    assert enter_wave(opened(node), now=expires) is None  # no entering under an expired head
    assert main_of(node) == one
    entered = enter_wave(opened(node), now=now + HOUR)
    assert entered is not None and entered.status == "new"
    assert head(node)["Config-Digest"] == second.digest
    assert head(node)["Rollout-Wave"] == "1"
    assert enter_wave(opened(node), now=now + HOUR) is None  # nothing waits any more


def test_a_first_snapshot_waits_with_no_head_at_all(
    keyed: Callable[..., NodeUnderTest], simulator: RepositorySimulator, now: int
) -> None:
    node = keyed("solo")
    first = publish(simulator, 1, rollout_of(now, (HOUR, 100)))

    assert fetch_at(node, now).status == "waiting"

    assert node.refs()["HEAD"] == "-> refs/heads/main"
    assert "refs/heads/main" not in node.refs()
    assert status_at(node, now)["head"] is None
    assert fetch_at(node, now + HOUR).status == "new"
    assert head(node)["Config-Digest"] == first.digest


# ---- a fleet ---------------------------------------------------------------------------------


FLEET = [f"fleet-{n}" for n in range(20)]
FLEET_WAVES = ((-HOUR, 10), (HOUR, 30), (2 * HOUR, 60), (3 * HOUR, 100))


def test_a_fleet_of_twenty_nodes_enters_wave_by_wave_exactly_by_the_formula(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    nodes = {name: keyed(name) for name in FLEET}
    for node in nodes.values():
        on_first(node)
    second = publish(simulator, 2, rollout_of(now, *FLEET_WAVES))
    entered_in: dict[str, int] = {}

    for number, (offset, percent) in enumerate(FLEET_WAVES, start=1):
        newly = []
        for name, node in nodes.items():
            fetch_at(node, now + offset)
            took = head(node)["Config-Digest"] == second.digest
            assert took == (place(name) < percent * 100), (name, place(name), percent)
            if took and name not in entered_in:
                entered_in[name] = number
                newly.append(name)
                assert head(node)["Rollout-Wave"] == str(number)
        assert newly, f"wave {number} let no node in: the test's waves need other percents"

    # Each node entered with the first wave whose percent is above its position.
    for name, number in entered_in.items():
        first_above = next(
            n for n, (_, p) in enumerate(FLEET_WAVES, start=1) if place(name) < p * 100
        )
        assert number == first_above
    assert len(entered_in) == len(FLEET)


def test_two_hundred_keys_decide_by_the_formula_alone() -> None:
    rollout = Rollout(
        waves=tuple(Wave(at=1000 * n, percent=p) for n, p in ((1, 1), (2, 10), (3, 50), (4, 100))),
        salt=SALT,
    )
    keys = [bytes(named_key(f"key-{n}").verify_key) for n in range(200)]
    for at in (999, 1000, 1999, 2000, 3000, 4000):
        for key in keys:
            wait = RolloutWait(
                digest="sha256:" + "0" * 64,
                serial=1,
                position=Position(formula(SALT, key)),
                rollout=rollout,
            )
            expected = formula(SALT, key) < rollout_percent(rollout, at) * 100
            assert (
                (wait.admission(at) is not None) == expected == admits(rollout, wait.position, at)
            )


def rollout_percent(rollout: Rollout, at: int) -> int:
    opened_waves = [w.percent for w in rollout.waves if w.at <= at]
    return opened_waves[-1] if opened_waves else 0


# ---- the network changes its mind ------------------------------------------------------------


def resign(simulator: RepositorySimulator, release: Release, rollout: dict[str, Any]) -> None:
    """Serve ``release``'s head again, same serial and digest, with another rollout."""
    serial = release.serial
    again = simulator.release(
        serial,
        body=snapshot_body(),
        mutate_snapshot=lambda s: s["jobs"].update(max_queue=serial),
        mutate_head=lambda h: h.update(rollout=rollout),
    )
    assert again.digest == release.digest and again.head != release.head
    simulator.serve(again)


def test_a_paused_rollout_keeps_out_who_is_not_in_and_never_moves_who_is(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    low, high = keyed("pause-low"), keyed("pause-high")  # 24.48 % and 63.19 %
    percent = place("pause-low") // 100 + 1
    assert place("pause-high") >= percent * 100
    for node in (low, high):
        on_first(node)
    second = publish(simulator, 2, rollout_of(now, (-HOUR, percent), (HOUR, 100)))
    assert fetch_at(low, now).status == "new"
    assert fetch_at(high, now).status == "waiting"
    low_head, high_head = main_of(low), main_of(high)

    resign(simulator, second, rollout_of(now, (-HOUR, percent)))  # paused at `percent`

    assert fetch_at(low, now + HOUR).status == "current"
    kept_out = fetch_at(high, now + HOUR)
    assert kept_out.status == "waiting"
    assert kept_out.message.endswith(
        f"rollout {percent} % now, this node at {shown(place('pause-high'))} %, no wave reaches it"
    )
    assert (main_of(low), main_of(high)) == (low_head, high_head)
    assert enter_wave(opened(high), now=now + 5 * HOUR) is None
    view = status_at(high, now + HOUR)["waiting"][0]["rollout"]
    assert (view["wave"], view["enters_at"], view["in"]) == (None, None, False)

    resign(simulator, second, rollout_of(now, (-HOUR, percent), (2 * HOUR, 100)))  # resumed

    assert fetch_at(low, now + 2 * HOUR).status == "current"
    assert fetch_at(high, now + 2 * HOUR - 1).status == "waiting"
    assert fetch_at(high, now + 2 * HOUR).status == "new"
    assert main_of(low) == low_head
    assert head(high)["Rollout-Wave"] == "2"
    assert head(high)["Config-Digest"] == second.digest


def test_a_node_that_took_the_snapshot_keeps_it_when_a_pause_comes_late(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("pause-high")
    on_first(node)
    second = publish(simulator, 2, rollout_of(now, (-HOUR, 100)))
    assert fetch_at(node, now).status == "new"
    taken = main_of(node)

    # A "pause" that would put fewer nodes in (the tools refuse it; a node must not care).
    resign(simulator, second, rollout_of(now, (-HOUR, 0)))

    assert fetch_at(node, now + HOUR).status == "current"
    assert main_of(node) == taken
    assert status_at(node, now + HOUR)["waiting"] == []


def test_a_higher_serial_supersedes_the_waiting_snapshot(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("sup")
    on_first(node)
    publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"
    third = publish(simulator, 3, rollout_of(now, (2 * HOUR, 100)))

    assert fetch_at(node, now + 60).status == "waiting"

    report = status_at(node, now + 60)
    assert [(w["serial"], w["digest"]) for w in report["waiting"]] == [(3, third.digest)]
    assert report["waiting"][0]["rollout"]["enters_at"] == format_time(now + 2 * HOUR)
    # Serial 2's wave opens: it is no candidate any more.
    fetch_at(node, now + HOUR)
    assert enter_wave(opened(node), now=now + HOUR) is None
    assert serials_on_main(node) == ["1"]
    assert fetch_at(node, now + 2 * HOUR).status == "new"
    assert serials_on_main(node) == ["3", "1"]


def test_a_higher_serial_without_a_rollout_is_taken_at_once(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("sup")
    on_first(node)
    publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"
    third = publish(simulator, 3)

    assert fetch_at(node, now + 60).status == "new"

    assert head(node)["Config-Digest"] == third.digest
    assert "Rollout-Wave" not in head(node)
    assert status_at(node, now + 60)["waiting"] == []
    assert node.record()["rollout_wait"] is None
    assert enter_wave(opened(node), now=now + HOUR) is None
    assert serials_on_main(node) == ["3", "1"]


def test_a_head_with_bad_waves_is_rejected_and_nothing_changes(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("solo")
    on_first(node)
    publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"
    before, wait = node.snapshot(), node.record()["rollout_wait"]
    publish(simulator, 3, rollout_of(now, (HOUR, 25), (2 * HOUR, 10)))

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert (
        outcome.error_line == "rejected head.json: rollout wave 2 percent 10 is below wave 1's 25"
    )
    assert node.snapshot() == before
    assert node.record()["rollout_wait"] == wait
    assert node.record()["last_serial"] == 2


# ---- holds, quarantine and pins come first ---------------------------------------------------


def pin_first(node: NodeUnderTest, simulator: RepositorySimulator, now: int) -> str:
    """Serials 1 and 2 taken, then HEAD put back on serial 1 with stock git: a pin."""
    for serial in (1, 2):
        publish(simulator, serial)
        assert fetch_at(node, now).status == "new"
    pinned = node.git("rev-parse", "main~1").strip()
    node.git("checkout", "-q", "--detach", pinned)
    return pinned


def test_a_pin_holds_even_a_node_its_wave_lets_in(
    keyed: Callable[..., NodeUnderTest], simulator: RepositorySimulator, now: int
) -> None:
    node = keyed("held")
    pinned = pin_first(node, simulator, now)
    third = publish(simulator, 3, rollout_of(now, (-HOUR, 100)))

    outcome = fetch_at(node, now)

    assert outcome.message == (
        f"snapshot 3 ({third.digest}) stored, waiting: hold (HEAD moved with git to {pinned[:12]})"
    )
    assert node.refs()["HEAD"] == pinned
    assert enter_wave(opened(node), now=now + HOUR) is None
    assert node.refs()["HEAD"] == pinned
    waiting = status_at(node, now)["waiting"]
    assert [w["serial"] for w in waiting] == [3]
    assert waiting[0]["rollout"]["in"] is True


def test_a_quarantined_digest_stays_out_when_its_wave_opens(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("quar")
    on_first(node)
    one = main_of(node)
    second = publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"
    # As a failed apply of serial 2 on this node would have left it.
    agent = opened(node)
    agent.save(record.quarantine(agent.state, second.digest))

    assert enter_wave(opened(node), now=now + HOUR) is None
    resign(simulator, second, rollout_of(now, (HOUR, 100), (2 * HOUR, 100)))
    outcome = fetch_at(node, now + HOUR)

    assert outcome.message == f"snapshot 2 ({second.digest}) stored, waiting: quarantined"
    assert main_of(node) == one


# ---- metrics -----------------------------------------------------------------------------------


def metric_values(node: NodeUnderTest, when: float) -> dict[str, float]:
    return {
        m.name: m.value
        for m in node_metrics(opened(node), last_apply_s=None, now=when)
        if m.name.startswith("reconciler_rollout_")
    }


def test_metrics_show_the_wait_and_the_entry(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    node = keyed("solo")
    on_first(node)
    assert metric_values(node, now) == {"reconciler_rollout_waiting": 0}
    publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    fetch_at(node, now)

    assert metric_values(node, now) == {
        "reconciler_rollout_waiting": 1,
        "reconciler_rollout_enters_timestamp_seconds": now + HOUR,
        "reconciler_rollout_position_percent": place("solo") / 100,
    }
    fetch_at(node, now + HOUR)
    assert metric_values(node, now + HOUR) == {
        "reconciler_rollout_waiting": 0,
        "reconciler_rollout_position_percent": place("solo") / 100,
        "reconciler_rollout_entered_wave": 1,
        "reconciler_rollout_entered_timestamp_seconds": now + HOUR,
    }


# ---- the watch loop's timing, pure -------------------------------------------------------------


class Edges:
    """A random source that always draws the upper (or lower) bound."""

    def __init__(self, *, upper: bool) -> None:
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


def test_the_wave_jitter_is_at_most_a_minute_or_a_tenth_of_the_poll() -> None:
    assert wave_jitter(Timing(poll_s=3600), Edges(upper=True)) == 60.0
    assert wave_jitter(Timing(poll_s=30), Edges(upper=True)) == 3.0
    assert wave_jitter(Timing(poll_s=30), Edges(upper=False)) == 0.0
    seeded = random.Random(7)
    draws = [wave_jitter(Timing(poll_s=600), seeded) for _ in range(500)]
    assert min(draws) >= 0.0 and max(draws) <= 60.0 and max(draws) - min(draws) > 30


def test_watch_fetches_when_the_wave_opens_not_a_whole_poll_later() -> None:
    timing = Timing(poll_s=3600)
    schedule = Schedule(next_fetch=1000.0 + 3600, next_verify=1e9)

    woken = schedule.wake_for_wave(opens_in_s=100, now=1000.0, timing=timing, rng=Edges(upper=True))
    earliest = schedule.wake_for_wave(
        opens_in_s=100, now=1000.0, timing=timing, rng=Edges(upper=False)
    )

    assert woken.next_fetch == 1000.0 + 100 + 60
    assert earliest.next_fetch == 1100.0  # never before the wave
    assert woken.next_verify == schedule.next_verify and woken.failures == schedule.failures
    assert woken.pause_s(now=1000.0, timing=timing, rng=Edges(upper=False)) == 160.0


@pytest.mark.parametrize("opens_in_s", [None, 0, -5, 7200])
def test_no_wave_to_wait_for_or_one_after_the_next_poll_changes_nothing(
    opens_in_s: float | None,
) -> None:
    schedule = Schedule(next_fetch=1060.0, next_verify=5000.0, failures=2)
    assert (
        schedule.wake_for_wave(
            opens_in_s=opens_in_s, now=1000.0, timing=Timing(poll_s=60), rng=Edges(upper=True)
        )
        == schedule
    )


# ---- through Podman: resume, receipts, log and a real watch -------------------------------------


@pytest.fixture
def env(podman_clean: PodmanService, tmp_path: Path) -> dict[str, str]:
    return node_env(podman_clean, tmp_path / "hooks")


@pytest.mark.podman
def test_resume_lifts_the_hold_but_not_the_wave(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    env: dict[str, str],
    now: int,
) -> None:
    node = keyed("held")
    pinned = pin_first(node, simulator, now)
    third = publish(simulator, 3, rollout_of(now, (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"

    outcome = node.run("resume", env=env)

    assert outcome.exit_code == 0, outcome
    assert "HEAD unchanged (serial 3 waits: rollout 0 % now" in outcome.stdout
    report = node.status()
    assert report["hold"]["active"] is False
    assert [w["serial"] for w in report["waiting"]] == [3]
    # The pin is lifted (HEAD back on main, serial 2); serial 3 goes on waiting for its wave.
    assert (report["head"]["serial"], node.refs()["HEAD"]) == (2, "-> refs/heads/main")
    assert node.refs()["HEAD^{commit}"] != pinned
    assert report["head"]["digest"] != third.digest
    entered = fetch_at(node, now + HOUR)
    assert entered.status == "new"
    assert head(node)["Rollout-Wave"] == "1"


@pytest.mark.podman
def test_resume_takes_a_snapshot_its_wave_lets_in_and_records_the_wave(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    env: dict[str, str],
    now: int,
) -> None:
    node = keyed("held")
    pin_first(node, simulator, now)
    third = publish(simulator, 3, rollout_of(now, (-HOUR, 100)))
    fetch_at(node, now)

    outcome = node.run("resume", env=env)

    assert outcome.exit_code == 0, outcome
    assert "HEAD moved to serial 3" in outcome.stdout
    trailers = head(node)
    assert (trailers["Config-Digest"], trailers["Reason"]) == (third.digest, "resume")
    assert trailers["Rollout-Wave"] == "1"
    assert node.status()["waiting"] == []


@pytest.mark.podman
def test_the_receipt_and_the_log_show_the_wave_and_the_position(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    env: dict[str, str],
    now: int,
) -> None:
    node = keyed("solo")
    on_first(node)
    publish(simulator, 2, rollout_of(now, (HOUR, 100)))
    fetch_at(node, now)
    converged(once(node, env, "--offline"))
    assert head(node)["Serial"] == "1"
    assert fetch_at(node, now + HOUR).status == "new"

    converged(once(node, env, "--offline"))

    commit = head(node)["commit"]
    (receipt,) = receipts(node, commit)
    assert receipt["result"] == "converged"
    rollout = receipt["rollout"]
    assert {k: rollout[k] for k in ("wave", "wave_at", "position")} == {
        "wave": 1,
        "wave_at": format_time(now + HOUR),
        "position": shown(place("solo")),
    }
    assert parse_time(rollout["entered_at"]) <= time.time()
    log = node.run("log").ok().stdout.splitlines()
    assert f"wave 1 at {shown(place('solo'))} %" in log[0] and "applied: converged" in log[0]
    assert "wave" not in log[1]


FAKE_START = "2026-12-02T09:59:54Z"
WAVE_3 = "2026-12-02T10:00:00Z"
CANARY_SALT = "canaries-2026"
CANARY_KEY = "node-4971"  # position 37.21 % under CANARY_SALT


class Watch:
    """``reconcile watch`` as a process of its own, its clock set by ``faketime``."""

    def __init__(self, node: NodeUnderTest, env: dict[str, str], *, start: str) -> None:
        self.log_file = node.home / "watch.log"
        fake = {
            **os.environ,
            **node.env,
            **env,
            "TZ": "UTC",
            # Only the wall clock: the loop's sleeps run on the real monotonic clock.
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        when = start.replace("T", " ").removesuffix("Z")
        with self.log_file.open("wb") as err:
            self.process = subprocess.Popen(
                ["faketime", "-f", f"@{when}", *AGENT_COMMAND, "watch"],
                env=fake,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_for(self, text: str, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"never logged {text!r}; log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to the agent and to ``faketime`` around it (which does not pass it on)."""
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        self.wait_for("watch: stopped", timeout_s=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.kill()


@pytest.mark.podman
def test_a_real_watch_waits_for_its_wave_and_enters_when_it_opens(
    keyed: Callable[..., NodeUnderTest],
    file_server: FileServer,
    env: dict[str, str],
    watches: list[Watch],
) -> None:
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed")
    assert place(CANARY_KEY, CANARY_SALT) == 3721
    network = RepositorySimulator(folder=file_server.root, now=parse_time("2026-12-02T09:00:00Z"))
    node = keyed(CANARY_KEY, root=network.roots[1])
    poll = {"poll_s": 30, "heartbeat_s": 30, "retry_min_s": 5, "retry_max_s": 30, "cache_s": 86400}
    network.publish(1, body=snapshot_body(ttl=poll))
    assert fetch_at(node, parse_time(FAKE_START)).status == "new"
    waves = [
        {"at": "2026-12-01T10:00:00Z", "percent": 1},
        {"at": "2026-12-01T16:00:00Z", "percent": 5},
        {"at": WAVE_3, "percent": 100},
    ]
    second = network.publish(
        2,
        body=snapshot_body(ttl=poll, jobs={"max_tokens": 4096, "max_queue": 2, "timeout_s": 120}),
        mutate_head=lambda h: h.update(rollout={"salt": CANARY_SALT, "waves": waves}),
    )

    polls_before = file_server.stats.requests("/head.json")
    started = time.monotonic()
    watch = Watch(node, env, start=FAKE_START)
    watches.append(watch)
    watch.wait_for(
        f"snapshot 2 ({second.digest}) stored, waiting: rollout 5 % now, this node at 37.21 %, "
        f"enters at {WAVE_3} (wave 3)",
        timeout_s=20,
    )
    watch.wait_for("converge: converged on serial 1", timeout_s=20)
    watch.wait_for(
        f"snapshot 2 ({second.digest}) is the new HEAD (rollout wave 3, this node at 37.21 %)",
        timeout_s=30,
    )
    took = time.monotonic() - started
    watch.wait_for("converge: converged on serial 2", timeout_s=20)

    # The wave was 6 s after the start; the jitter adds at most 3 s (a tenth of poll_s = 30).
    assert took < 6 + 3 + 8, took
    polls = file_server.stats.requests("/head.json") - polls_before
    assert polls == 2, "woke for a poll, not for the wave"
    entered = node.record()["rollout_entered"]
    assert entered["wave"] == 3 and entered["position"] == "37.21"
    assert WAVE_3 <= entered["at"] <= "2026-12-02T10:00:06Z"
    assert head(node)["Rollout-Wave"] == "3"
    watch.stop()


def test_a_node_report_carries_the_rollout_it_waits_for_then_the_one_it_entered(
    keyed: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    on_first: Callable[[NodeUnderTest], Release],
    now: int,
) -> None:
    from reconciler.report.node_report import report_payload

    node = keyed("solo")
    at = place("solo")
    on_first(node)
    below = at // 100
    second = publish(simulator, 2, rollout_of(now, (-HOUR, below), (HOUR, 100)))
    assert fetch_at(node, now).status == "waiting"

    waiting = report_payload(opened(node), now=now)["rollout"]

    assert waiting == {
        "position": at / 100,
        "percent_now": below,
        "config_digest": second.digest,
        "in": False,
        "wave": 2,
        "enters_at": format_time(now + HOUR),
    }
    assert fetch_at(node, now + HOUR).status == "new"
    entered = report_payload(opened(node), now=now + HOUR)["rollout"]
    assert entered == {
        "position": at / 100,
        "percent_now": None,
        "config_digest": second.digest,
        "in": True,
        "wave": 2,
        "entered_at": format_time(now + HOUR),
    }
