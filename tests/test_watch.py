"""``reconcile watch`` and the agent lock, run as real subprocesses.

The timers are unit-tested in test_schedule.py; everything here runs the real
command (``python -c 'from reconciler.cli import main; main()'``) against the served origin
and the private Podman service, and talks to it only with signals, files and the origin's
request counters. Snapshots here poll every second (``ttl.poll_s = 1``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
    running,
    runtime,
    snapshot_body,
    write_hook,
)
from tests.support.signing import RepositorySimulator

FAST_TTL = {"poll_s": 1, "heartbeat_s": 30, "retry_min_s": 1, "retry_max_s": 4, "cache_s": 86400}


# ---- running the agent as a process -------------------------------------------------------


class Agent:
    """One ``reconcile …`` process of a node; its stderr (the log) goes to a file."""

    def __init__(self, node: NodeUnderTest, env: dict[str, str], *args: str) -> None:
        self.log_file = node.home / f"agent-{time.monotonic_ns()}.log"
        self.out_file = self.log_file.with_suffix(".out")
        with self.log_file.open("wb") as err, self.out_file.open("wb") as out:
            self.process = subprocess.Popen(
                [*AGENT_COMMAND, *args],
                env={**os.environ, **node.env, **env},
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_file.read_text(errors="replace")

    def wait_for(self, text: str, *, timeout_s: float = 15, after: int = 0) -> int:
        """Wait until ``text`` is in the log past offset ``after``; return the log's length."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.log()
            if text in log[after:]:
                return len(log)
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never logged {text!r}; log:\n{log}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 30) -> int:
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Agent]]:
    """``spawn(node, env, *args)``: start ``reconcile ARGS``; killed after the test."""
    agents: list[Agent] = []

    def start(node: NodeUnderTest, env: dict[str, str], *args: str) -> Agent:
        agent = Agent(node, env, *args)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.kill()


def until(check: Callable[[], Any], *, timeout_s: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def by_hand(podman: PodmanService, *args: str) -> None:
    """An operator's ``podman`` command; retried while the agent is busy with the container."""
    deadline = time.monotonic() + 10
    while (done := podman.cli(*args, check=False)).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.1)


def request_times(server: FileServer, path: str, seconds: float) -> list[float]:
    """Sample the server's counter for ``path``; the monotonic time of each new request."""
    times: list[float] = []
    seen = server.stats.requests(path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = server.stats.requests(path)
        times.extend([time.monotonic()] * (now - seen))
        seen = now
        time.sleep(0.01)
    return times


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    return tmp_path / "hooks"


@pytest.fixture
def env(podman_clean: PodmanService, hooks: Path) -> dict[str, str]:
    return node_env(podman_clean, hooks)


@pytest.fixture
def web(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    test_images: dict[str, str],
    env: dict[str, str],
) -> dict[str, Any]:
    """Snapshot 1 (a web runtime, 1 s poll) published and converged; its runtime entry."""
    entry = runtime("web", test_images["web"])
    simulator.publish(body=snapshot_body(runtimes=[entry], ttl=FAST_TTL))
    converged(once(node, env))
    return entry


# ---- watch (every test from here on needs the Podman service) ------------------------------


@pytest.mark.podman
def test_watch_polls_every_poll_s_with_jitter_and_conditional_requests(
    node: NodeUnderTest,
    web: dict[str, Any],
    file_server: FileServer,
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    agent = spawn(node, env, "watch")
    agent.wait_for("watch: started")

    times = request_times(file_server, "/head.json", 5.5)

    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 4 <= len(times) <= 7, times
    assert all(0.85 <= gap <= 2.0 for gap in gaps), gaps  # 1 s ± 10 %, plus the cycle
    etag = file_server.stats.headers("/head.json")[-1].get("if-none-match")
    assert etag, "watch polls without If-None-Match"
    assert file_server.stats.statuses("/head.json")[-3:] == [304, 304, 304]
    agent.send(signal.SIGTERM)
    assert agent.wait() == 0


@pytest.mark.podman
def test_watch_backs_off_from_retry_min_to_retry_max_while_the_origin_fails(
    node: NodeUnderTest,
    web: dict[str, Any],
    file_server: FileServer,
    podman_clean: PodmanService,
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    file_server.faults.set("/head.json", status=500)
    agent = spawn(node, env, "watch")

    times = request_times(file_server, "/head.json", 9.0)

    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 1 s, then 1-2 s, 2-4 s, 2-4 s ... instead of a request every second.
    assert 3 <= len(times) <= 6, gaps
    assert gaps[0] < 1.6
    assert max(gaps) >= 2.0
    assert all(gap <= 4.7 for gap in gaps), gaps
    assert "origin unreachable" in agent.log()
    # Drift repair does not wait for the origin: a container removed by hand comes back.
    by_hand(podman_clean, "rm", "--force", "--time", "0", "reconciler-web")
    until(lambda: "reconciler-web" in running(podman_clean), timeout_s=6, what="repair")
    file_server.faults.clear()
    agent.send(signal.SIGTERM)
    assert agent.wait() == 0


@pytest.mark.podman
def test_watch_repairs_drift_every_cycle(
    node: NodeUnderTest,
    web: dict[str, Any],
    podman_clean: PodmanService,
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    agent = spawn(node, env, "watch")
    agent.wait_for("watch: started")
    before = running(podman_clean)

    def repaired() -> bool:
        return running(podman_clean) == before

    for _ in range(2):
        by_hand(podman_clean, "rm", "--force", "--time", "0", "reconciler-web")
        until(repaired, timeout_s=6, what="the runtime back")
    by_hand(podman_clean, "stop", "--time", "0", "reconciler-web")
    until(repaired, timeout_s=6, what="the runtime restarted")
    agent.send(signal.SIGTERM)
    assert agent.wait() == 0
    # Each repair is an apply attempt with its receipt. (Which action repairs depends on what
    # the cycle saw mid-removal: a container being removed may need a start or a replace.)
    repairs = [r for r in receipts(node, head(node)["commit"]) if r["reason"] == "repair"]
    assert len(repairs) >= 3
    assert repairs[-1]["result"] == "converged"


@pytest.mark.podman
def test_sighup_polls_now_and_rereads_settings_keeping_the_old_ones_if_bad(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    slow = {**FAST_TTL, "poll_s": 3600}
    subclouds = [{"id": "eu-a", "enabled": True}, {"id": "eu-b", "enabled": True}]
    web = runtime("web", test_images["web"])
    body = snapshot_body(
        runtimes=[web], ttl=slow, participation={"modes": ["testnet"], "subclouds": subclouds}
    )
    simulator.publish(body=body)
    converged(once(node, env))
    agent = spawn(node, env, "watch")
    mark = agent.wait_for("converge:")  # the first cycle is over
    polled = file_server.stats.requests("/head.json")

    # Poll now: a new snapshot is picked up long before poll_s.
    second = simulator.publish(body={**body, "jobs": {**body["jobs"], "max_queue": 3}})
    agent.send(signal.SIGHUP)
    until(lambda: head(node)["Config-Digest"] == second.digest, what="snapshot 2 fetched")
    until(lambda: node.status()["converged"], what="snapshot 2 applied")
    assert file_server.stats.requests("/head.json") == polled + 1, agent.log()

    # A settings file that does not parse: the old settings stay, watch goes on.
    good_settings = node.config.read_text()
    node.config.write_text(good_settings + "opt_out_subclouds = [\n")
    agent.send(signal.SIGHUP)
    mark = agent.wait_for("keeping the old settings", after=mark)
    assert agent.process.poll() is None

    # A good one: the next cycle uses it (eu-b opted out of).
    node.config.write_text(good_settings + 'opt_out_subclouds = ["eu-b"]\n')
    agent.send(signal.SIGHUP)
    agent.wait_for("settings re-read", after=mark)
    participation = node.state_dir / "runtime" / "participation.json"
    until(
        lambda: json.loads(participation.read_text())["subclouds"] == ["eu-a"],
        what="participation without eu-b",
    )
    agent.send(signal.SIGTERM)
    assert agent.wait() == 0
    assert node.status()["applied"]["digest"] == second.digest
    assert list(running(podman_clean)) == ["reconciler-web"]


@pytest.mark.podman
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_current_apply_and_exits_zero(
    sig: int,
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    spawn: Callable[..., Agent],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    started = tmp_path / "pre-apply-started"
    write_hook(hooks, "pre-apply", f"touch {started}; sleep 1.5")
    release = simulator.publish(
        body=snapshot_body(runtimes=[runtime("web", test_images["web"])], ttl=FAST_TTL)
    )
    agent = spawn(node, env, "watch")
    until(started.exists, what="the apply to start")

    agent.send(sig)

    assert agent.wait() == 0
    assert running(podman_clean) == {"reconciler-web": release.digest}
    [receipt] = receipts(node, head(node)["commit"])
    assert receipt["result"] == "converged"
    assert node.record()["apply_in_progress"] is None
    assert "watch: stopped" in agent.log()


@pytest.mark.podman
def test_log_format_json_gives_one_json_object_per_line(
    node: NodeUnderTest,
    web: dict[str, Any],
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    agent = spawn(node, env, "--log-format", "json", "watch")
    agent.wait_for('"watch: started"')
    agent.wait_for("converge")
    agent.send(signal.SIGTERM)
    assert agent.wait() == 0

    records = [json.loads(line) for line in agent.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("converge:") for r in records)


# ---- one reconciler at a time -------------------------------------------------------------


@pytest.mark.podman
def test_a_second_watch_exits_one_naming_the_first(
    node: NodeUnderTest,
    web: dict[str, Any],
    spawn: Callable[..., Agent],
    env: dict[str, str],
) -> None:
    first = spawn(node, env, "watch")
    first.wait_for("watch: started")

    second = spawn(node, env, "watch")

    assert second.wait() == 1
    assert f"pid {first.pid} holds the lock" in second.log()
    first.send(signal.SIGTERM)
    assert first.wait() == 0


@pytest.mark.podman
def test_once_while_another_holds_the_lock_exits_one_or_waits_with_wait(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    spawn: Callable[..., Agent],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    write_hook(hooks, "pre-apply", f"touch {started}; sleep 2")
    simulator.publish(body=snapshot_body(runtimes=[runtime("web", test_images["web"])]))
    busy = spawn(node, env, "once")
    until(started.exists, what="the first once to hold the lock")

    refused = once(node, env)
    assert refused.exit_code == 1
    assert refused.error_line == f"another reconciler is running (pid {busy.pid} holds the lock)"

    waited = once(node, env, "--wait", "20")
    assert waited.exit_code == 0, waited.stdout + waited.stderr
    assert busy.wait() == 0


@pytest.mark.podman
def test_a_lock_left_by_a_killed_agent_is_taken_over(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    spawn: Callable[..., Agent],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    write_hook(hooks, "pre-apply", f"[ -e {started} ] && exit 0; touch {started}; sleep 60")
    release = simulator.publish(body=snapshot_body(runtimes=[runtime("web", test_images["web"])]))
    victim = spawn(node, env, "once")
    until(started.exists, what="the first once to hold the lock")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (node.state_dir / "lock").read_text().strip() == str(victim.pid)

    converged(once(node, env))

    assert running(podman_clean) == {"reconciler-web": release.digest}
    results = [r["result"] for r in receipts(node, head(node)["commit"])]
    assert results == ["interrupted", "converged"]
