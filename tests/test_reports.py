"""Node reports (docs/contract.md §9): a real node PUTs signed reports to real collectors.

The collector is Debian's nginx with the WebDAV location docs/publishing.md documents
(``tests.support.collector``); the stored report is checked with securesystemslib's DSSE
code, not ours. Collectors that fail are real HTTP servers on 127.0.0.1 answering 500,
redirecting, or never answering: the node logs one line and its converge is unaffected.
Skips, with the reason, when nginx is not installed (.ci/setup installs nginx-light).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.signer import SSlibKey

from reconciler.core.nodereport import report_base
from tests.support.collector import Collector, start_collector
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import AGENT_COMMAND, converged, node_env, once, snapshot_body
from tests.support.signing import RepositorySimulator

REPORT_TYPE = "application/vnd.resultity.report+json"
FAST_TTL = {"poll_s": 1, "heartbeat_s": 1, "retry_min_s": 1, "retry_max_s": 4, "cache_s": 86400}


# ---- where reports go (pure) ----------------------------------------------------------------


def test_the_setting_wins_an_empty_one_turns_reports_off_and_the_snapshot_url_is_relative() -> None:
    origin = "https://config.example.net/net/"
    assert report_base(setting="", announced="https://c.example/r/", origin=origin) is None
    assert report_base(setting="https://c.example/r", announced=None, origin=origin) == (
        "https://c.example/r/"
    )
    assert report_base(setting=None, announced="../reports/", origin=origin) == (
        "https://config.example.net/reports/"
    )
    assert report_base(setting=None, announced="https://c.example/x/", origin=origin) == (
        "https://c.example/x/"
    )
    assert report_base(setting=None, announced=None, origin=origin) is None
    # A file:// origin cannot take a PUT, nor can a relative URL resolved against it.
    assert report_base(setting=None, announced="reports/", origin="file:///media/usb/") is None


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    started = start_collector(tmp_path / "collector", tmp_path / "collector-nginx")
    if started is None:
        pytest.skip("nginx is not installed (.ci/setup installs nginx-light)")
    yield started
    started.close()


@pytest.fixture
def env(podman_clean: PodmanService, tmp_path: Path) -> dict[str, str]:
    return node_env(podman_clean, tmp_path / "hooks")


class _Misbehaving(BaseHTTPRequestHandler):
    """Answers every PUT the way the server's ``mode`` says: 500, redirect or never."""

    def do_PUT(self) -> None:
        server: _BadCollector = self.server  # type: ignore[assignment]
        server.puts += 1
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if server.mode == "hang":
            server.release.wait(60)
            return
        if server.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere/")
        else:
            self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BadCollector(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _Misbehaving)
        self.mode = mode
        self.puts = 0
        self.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/reports/"


@pytest.fixture
def bad_collector() -> Iterator[Callable[[str], _BadCollector]]:
    servers: list[_BadCollector] = []

    def start(mode: str) -> _BadCollector:
        server = _BadCollector(mode)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


# ---- helpers --------------------------------------------------------------------------------


def node_keyid(node: NodeUnderTest) -> tuple[str, bytes]:
    public = bytes.fromhex((node.state_dir / "node.pub").read_text().strip())
    return hashlib.sha256(public).hexdigest(), public


def sslib_verified(data: bytes, public: bytes) -> dict[str, Any]:
    """The payload, after securesystemslib verified the node's signature over it."""
    keyid = hashlib.sha256(public).hexdigest()
    key = SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(public), keyid=keyid)
    envelope = SslibEnvelope.from_dict(json.loads(data))
    assert envelope.payload_type == REPORT_TYPE
    verified = envelope.verify([key], 1)
    assert set(verified) == {keyid}
    payload = json.loads(envelope.pae().split(b" ", 4)[4])  # PAE's last field is the payload
    assert payload == json.loads(base64.b64decode(json.loads(data)["payload"]))
    return payload  # type: ignore[no-any-return]


def report_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " report: " in line]


# ---- once -----------------------------------------------------------------------------------


@pytest.mark.podman
def test_once_puts_a_signed_report_into_nginx_dav_that_securesystemslib_verifies(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    collector: Collector,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    release = simulator.publish(body=snapshot_body(ttl=FAST_TTL))
    metrics = tmp_path / "node.prom"
    env = {**env, "RECONCILER_REPORT_URL": collector.url, "RECONCILER_METRICS_PATH": str(metrics)}

    outcome = converged(once(node, env))

    assert report_lines(outcome.stderr) == []  # a report that worked logs nothing
    keyid, public = node_keyid(node)
    stored = collector.nodes / f"{keyid}.json"
    data = stored.read_bytes()
    assert len(data) <= 64 * 1024
    payload = sslib_verified(data, public)
    assert payload["node"] == keyid and payload["public"] == public.hex()
    assert payload["network"] == "testnet"
    assert payload["head"] == {"serial": release.serial, "config_digest": release.digest}
    assert payload["applied"]["config_digest"] == release.digest
    assert payload["converged"] is True and payload["hold"] is False
    assert payload["quarantined"] == [] and payload["waiting"] == []
    assert payload["last_error"] is None and payload["rollout"] is None
    assert payload["gpus"] == {"source": "none", "devices": [], "vram_mib": None}
    fields = {"node", "public", "network", "at", "agent_version", "head", "applied"}
    fields |= {"converged", "hold", "quarantined", "waiting", "rollout", "last_error"}
    assert payload["excluded_for_vram"] == [] and payload["held"] == []
    assert set(payload) == fields | {"models", "containers", "gpus", "excluded_for_vram", "held"}
    status = node.status()["report"]
    assert status["ok"] is True and status["status"] == 201
    assert status["url"] == f"{collector.url}nodes/{keyid}.json"

    converged(once(node, env))  # the metrics of this pass count the first report
    assert node.status()["report"]["status"] == 204  # nginx: replaced in place
    text = metrics.read_text()
    assert 'reconciler_reports_total{result="ok"} 1' in text
    assert 'reconciler_reports_total{result="failed"} 0' in text
    assert "last report" in node.status_text()


@pytest.mark.podman
@pytest.mark.parametrize("mode", ["500", "redirect", "hang"])
def test_a_collector_that_fails_redirects_or_hangs_costs_one_log_line_and_nothing_else(
    mode: str,
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    bad_collector: Callable[[str], _BadCollector],
    env: dict[str, str],
) -> None:
    simulator.publish(body=snapshot_body(ttl=FAST_TTL))
    server = bad_collector(mode)
    started = time.monotonic()

    outcome = converged(once(node, {**env, "RECONCILER_REPORT_URL": server.url}))

    assert time.monotonic() - started < 30
    assert "converged" in outcome.stdout
    lines = report_lines(outcome.stderr)
    assert len(lines) == 1, outcome.stderr
    expected = {"500": "500 Internal Server Error", "redirect": "307", "hang": "timed out"}
    assert expected[mode] in lines[0]
    assert server.puts == 1  # no redirect followed, no retry within the pass
    report = node.status()["report"]
    assert report["ok"] is False
    assert report["status"] == {"500": 500, "redirect": 307, "hang": None}[mode]
    assert node.status()["converged"] is True and node.status()["last_error"] is None


# ---- watch ----------------------------------------------------------------------------------


class _Watch:
    def __init__(self, node: NodeUnderTest, env: dict[str, str]) -> None:
        self.log_file = node.home / f"watch-{time.monotonic_ns()}.log"
        with self.log_file.open("wb") as err:
            self.process = subprocess.Popen(
                [*AGENT_COMMAND, "watch"],
                env={**os.environ, **node.env, **env},
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def watch() -> Iterator[Callable[[NodeUnderTest, dict[str, str]], _Watch]]:
    started: list[_Watch] = []

    def start(node: NodeUnderTest, env: dict[str, str]) -> _Watch:
        started.append(_Watch(node, env))
        return started[-1]

    yield start
    for agent in started:
        agent.kill()


def until(check: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.podman
def test_watch_reports_every_heartbeat_to_the_url_the_snapshot_names(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    collector: Collector,
    env: dict[str, str],
    watch: Callable[[NodeUnderTest, dict[str, str]], _Watch],
) -> None:
    # No report_url setting: the snapshot's reports.url is the one in force.
    simulator.publish(body=snapshot_body(ttl=FAST_TTL, reports={"url": collector.url}))
    keyid, public = node_keyid(node)
    stored = collector.nodes / f"{keyid}.json"
    agent = watch(node, env)

    first = until(lambda: stored.exists() and stored.read_bytes(), timeout_s=30, what="report")
    first_at = sslib_verified(first, public)["at"]
    later = until(
        lambda: (data := stored.read_bytes()) != first and data,
        timeout_s=10,
        what="the next heartbeat's report",
    )

    payload = sslib_verified(later, public)
    assert payload["at"] >= first_at and payload["converged"] is True
    assert agent.stop() == 0
    assert report_lines(agent.log()) == []


@pytest.mark.podman
def test_watch_keeps_converging_every_poll_while_the_collector_hangs(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    bad_collector: Callable[[str], _BadCollector],
    env: dict[str, str],
    watch: Callable[[NodeUnderTest, dict[str, str]], _Watch],
) -> None:
    server = bad_collector("hang")
    simulator.publish(body=snapshot_body(ttl=FAST_TTL))
    agent = watch(node, {**env, "RECONCILER_REPORT_URL": server.url})

    until(lambda: server.puts >= 1, timeout_s=30, what="the first PUT")
    passes = agent.log().count("converge:")
    # While the one report hangs (up to its 10 s deadline), cycles go on at poll_s = 1.
    until(
        lambda: agent.log().count("converge:") >= passes + 3,
        timeout_s=8,
        what="three more passes while the report hangs",
    )
    until(lambda: report_lines(agent.log()), timeout_s=15, what="the report's log line")
    assert agent.stop() == 0
    lines = report_lines(agent.log())
    assert lines and all("timed out" in line for line in lines), agent.log()
    assert len(lines) <= server.puts  # one line per failed report, no more
