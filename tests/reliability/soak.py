"""Soak: ``reconcile watch`` for a while against a busy network and a faulty world.

While ``watch`` runs (TTL: poll every second, retry 1 to 4 s), a publisher puts out a new
random snapshot every few seconds (``generator``), and at random intervals one fault is
injected for a few seconds: the origin answers 503, a managed container is killed behind
the agent's back, or the (private) Podman service is stopped and started again.

At the end the faults stop, the node must converge on the last snapshot published, and:

* ``invariants.converged_problems`` finds nothing (containers and trees are HEAD's, files
  match their digests, no temporary file, ``git fsck`` and ``reconcile verify`` pass);
* every apply that converged left exactly one receipt saying so;
* the watch process has as many open file descriptors as after its first convergence, and
  its resident memory grew by less than ``RSS_GROWTH_KIB`` (in a soak of ``LONG_SOAK_S`` or
  more: by less than half that over the second half, since a Python process keeps what its
  allocator once took and a leak is what keeps climbing);
* SIGTERM ends it with exit 0.

From a test (tests/reliability/test_soak.py: 30 s, or RECONCILER_SOAK_S seconds) or alone::

    python -m tests.reliability.soak --seconds 1800 [--seed S] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler.cli import cli
from tests.reliability.agent import AgentCommand, kill_group, process_figures
from tests.reliability.generator import SnapshotGenerator
from tests.reliability.invariants import converged_problems, open_node, receipts
from tests.reliability.services import PrivatePodman
from tests.reliability.standalone import run_test_alone
from tests.support.fileserver import Fault, FileServer
from tests.support.signing import RepositorySimulator

__all__ = ["SoakReport", "run_soak"]

SECONDS_ENV = "RECONCILER_SOAK_S"
SEED_ENV = "RECONCILER_SOAK_SEED"
REPORT_ENV = "RECONCILER_SOAK_REPORT"

FAST_TTL = {"poll_s": 1, "heartbeat_s": 30, "retry_min_s": 1, "retry_max_s": 4, "cache_s": 3600}
PUBLISH_EVERY_S = (3.0, 6.0)
FAULT_EVERY_S = (3.0, 7.0)
FAULT_LASTS_S = (2.0, 5.0)
RSS_GROWTH_KIB = 16 * 1024  # a Python process keeps what it once allocated; leaks grow on
LONG_SOAK_S = 600.0  # from here on, memory is judged by its second half (see _check_end)
SAMPLE_EVERY_S = 30.0
CONVERGE_WITHIN_S = 120.0
_APPLY_CONVERGED = re.compile(r"converged on serial \d+ \(sha256:[0-9a-f]{64}\): ")


@dataclass
class SoakReport:
    seed: int
    seconds: float = 0.0
    published: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    applies_converged: int = 0
    receipts: int = 0
    converged_receipts: int = 0
    start: dict[str, int] = field(default_factory=dict)  # fds, rss_kib after first convergence
    end: dict[str, int] = field(default_factory=dict)
    rss_series_kib: list[int] = field(default_factory=list)  # every SAMPLE_EVERY_S, idle
    containers_start: int = 0
    containers_end: int = 0
    temporary_files_end: int = 0
    open_files: list[str] = field(default_factory=list)  # what the watch holds at the end
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"soak (seed {self.seed}) {self.seconds:.0f} s: {self.published} snapshots, "
            f"faults {self.faults}, {self.applies_converged} converged applies, "
            f"{self.receipts} receipts; fds {self.start.get('fds')}→{self.end.get('fds')}, "
            f"RSS {self.start.get('rss_kib')}→{self.end.get('rss_kib')} KiB"
        )


class _Log:
    """Collects the watch's stderr (one JSON object per line) without blocking it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def messages(self) -> list[str]:
        found = []
        for line in list(self.lines):
            try:
                found.append(str(json.loads(line)["message"]))
            except (ValueError, KeyError, TypeError):
                found.append(line.strip())
        return found

    def join(self) -> None:
        self._thread.join(timeout=10)


def _status(env: dict[str, str]) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli, ["status", "--json"], env=env, catch_exceptions=False, standalone_mode=False
    )
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def _wait_converged(env: dict[str, str], digest: str, *, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        status = _status(env)
        if status["converged"] and status["applied"]["digest"] == digest:
            return True
        time.sleep(0.5)
    return False


def run_soak(
    *,
    seconds: float,
    seed: int,
    agent: AgentCommand,
    simulator: RepositorySimulator,
    server: FileServer,
    podman: PrivatePodman,
    images: dict[str, str],
    log: Callable[[str], None] = print,
) -> SoakReport:
    assert simulator.folder is not None
    rng = random.Random(seed)
    report = SoakReport(seed=seed)
    generator = SnapshotGenerator(origin=simulator.folder, images=images, seed=seed)

    def publish() -> str:
        body = generator.next_body(changes=1)
        body["ttl"] = dict(FAST_TTL)
        report.published += 1
        return simulator.publish(body=body).digest

    latest = publish()
    env = agent.env
    process = agent.start("watch", env={"RECONCILER_LOG_FORMAT": "json"})
    watch_log = _Log(process)
    started = time.monotonic()
    try:
        if not _wait_converged(env, latest, within_s=CONVERGE_WITHIN_S):
            report.problems.append("the first snapshot never converged")
            return report
        report.start = _quiet_figures(process.pid)
        report.containers_start = _managed_count(podman)
        stop_at = time.monotonic() + seconds
        next_publish = time.monotonic() + rng.uniform(*PUBLISH_EVERY_S)
        next_fault = time.monotonic() + rng.uniform(*FAULT_EVERY_S)
        next_sample = time.monotonic() + SAMPLE_EVERY_S
        while time.monotonic() < stop_at:
            if process.poll() is not None:
                report.problems.append(f"watch exited with {process.returncode} mid-soak")
                return report
            now = time.monotonic()
            if now >= next_publish:
                latest = publish()
                next_publish = now + rng.uniform(*PUBLISH_EVERY_S)
            if now >= next_sample:
                report.rss_series_kib.append(_quiet_figures(process.pid, samples=10)["rss_kib"])
                next_sample = time.monotonic() + SAMPLE_EVERY_S
            if now >= next_fault:
                kind = _inject(rng, server=server, podman=podman)
                report.faults[kind] = report.faults.get(kind, 0) + 1
                next_fault = time.monotonic() + rng.uniform(*FAULT_EVERY_S)
            time.sleep(0.2)
        report.seconds = time.monotonic() - started
        # Faults over. A container killed during its health gate looks like a snapshot that
        # does not run, so that snapshot may have been quarantined: the network's answer is
        # a newer one, and the node must reach it without any help.
        latest = publish()
        if not _wait_converged(env, latest, within_s=CONVERGE_WITHIN_S):
            report.problems.append(f"not converged on the last snapshot {latest[:19]}…")
        report.end = _quiet_figures(process.pid)
        report.open_files = _open_files(process.pid)
        report.containers_end = _managed_count(podman)
    finally:
        server.faults.clear()
        if not _podman_up(podman):
            podman.start()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(process)
            process.wait()
        report.exit_code = process.returncode
        watch_log.join()
    _check_end(report, env=env, messages=watch_log.messages())
    log(report.line())
    return report


def _check_end(report: SoakReport, *, env: dict[str, str], messages: list[str]) -> None:
    if report.exit_code != 0:
        report.problems.append(f"watch exited {report.exit_code} on SIGTERM")
    report.problems += converged_problems(env)
    node = open_node(env)
    node_receipts = [payload for _oid, payload in receipts(node)]
    report.receipts = len(node_receipts)
    converged = [r for r in node_receipts if r.get("result") == "converged"]
    report.converged_receipts = len(converged)
    # An apply that converged logs "converged on serial N (digest): K container action(s), …"
    # (a rollback's inside the failure it follows); a pass with nothing to do logs the same
    # without the colon. Receipts written for a convergence found by a later pass carry the
    # step "settled" (or a note, after a kill).
    applied = [m for m in messages if _APPLY_CONVERGED.search(m)]
    report.applies_converged = len(applied)
    signed_by_apply = [
        r
        for r in converged
        if "note" not in r and not any(s.get("step") == "settled" for s in r.get("steps", []))
    ]
    if len(signed_by_apply) != len(applied):
        report.problems.append(
            f"{len(applied)} applies converged but {len(signed_by_apply)} receipts say so"
        )
    if report.end.get("fds") != report.start.get("fds"):
        report.problems.append(
            f"open files {report.start.get('fds')} → {report.end.get('fds')}: {report.open_files}"
        )
    growth = report.end.get("rss_kib", 0) - report.start.get("rss_kib", 0)
    series = report.rss_series_kib
    if report.seconds >= LONG_SOAK_S and len(series) >= 4:
        # Allocator arenas and caches fill up early and level off; a leak keeps climbing.
        late = report.end.get("rss_kib", 0) - series[len(series) // 2]
        if late > RSS_GROWTH_KIB // 2:
            report.problems.append(f"resident memory grew by {late} KiB in the second half")
    elif growth > RSS_GROWTH_KIB:
        report.problems.append(f"resident memory grew by {growth} KiB")
    from tests.reliability.invariants import temporary_files

    report.temporary_files_end = len(temporary_files(node.paths.state_dir))


def _quiet_figures(pid: int, *, samples: int = 30, every_s: float = 0.1) -> dict[str, int]:
    """Open files and memory between two cycles: a one-second poll keeps watch busy most of
    the time, so the least seen over a few seconds is what it holds when idle."""
    seen = [process_figures(pid) for _ in range(samples) if time.sleep(every_s) is None]
    return {key: min(s[key] for s in seen) for key in ("fds", "rss_kib")}


def _open_files(pid: int) -> list[str]:
    """What each descriptor is; a socket is named by its unix path or TCP peer port."""
    peers: dict[str, str] = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7:
            peers[fields[6]] = fields[7] if len(fields) > 7 else "unix (unnamed)"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            peers[fields[9]] = "tcp to port " + str(int(fields[2].rsplit(":", 1)[1], 16))
    found = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = target.removeprefix("socket:[").removesuffix("]")
        found.append(f"{fd}→{peers.get(inode, target) if target.startswith('socket:') else target}")
    return found


def _managed_count(podman: PrivatePodman) -> int:
    listed = podman.service.cli(
        "ps", "--all", "--filter", "label=io.resultity.reconciler.managed=true", "--format", "json"
    ).stdout
    return len(json.loads(listed or "[]"))


def _podman_up(podman: PrivatePodman) -> bool:
    return podman.service.cli("info", "--format", "json", check=False, timeout=30).returncode == 0


def _inject(rng: random.Random, *, server: FileServer, podman: PrivatePodman) -> str:
    """One fault for a few seconds; returns its name. Blocks while the fault lasts."""
    kind = rng.choice(["origin-503", "container-killed", "podman-stopped"])
    lasts = rng.uniform(*FAULT_LASTS_S)
    if kind == "origin-503":
        server.faults.set("/head.json", Fault(status=503))
        time.sleep(lasts)
        server.faults.clear("/head.json")
    elif kind == "container-killed":
        names = json.loads(
            podman.service.cli(
                "ps", "--filter", "label=io.resultity.reconciler.managed=true", "--format", "json"
            ).stdout
            or "[]"
        )
        if names:
            victim = rng.choice(names)["Names"][0]
            podman.service.cli("kill", victim, check=False)
    else:
        podman.stop()
        time.sleep(lasts)
        podman.start()
    return kind


# ---- on its own ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak")
    parser.add_argument("--seconds", type=float, default=180, help="how long to soak")
    parser.add_argument("--seed", type=int, default=None, help="replay a soak")
    parser.add_argument("--report", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    report = args.report or Path(f"soak-{int(time.time())}.json")
    env = {SECONDS_ENV: str(args.seconds), REPORT_ENV: str(report.resolve())}
    if args.seed is not None:
        env[SEED_ENV] = str(args.seed)
    test_file = Path(__file__).resolve().parent / "test_soak.py"
    return run_test_alone(test_file, env=env, report=report)


if __name__ == "__main__":
    sys.exit(main())
