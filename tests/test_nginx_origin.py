"""An origin on stock infrastructure: what ``reconcile publish`` writes, served by nginx.

nginx runs from a private prefix in tmp (``-p``, ``daemon off``, pid and logs in tmp) on
127.0.0.1:<free port>, with docs/demo/nginx.conf.in: the configuration docs/publishing.md
documents is the one tested here. The network side is the real CLI (``keygen``, ``root``,
``publish``); the node is a real one (``reconcile init`` / ``fetch``). Skips, with the reason,
when nginx is not installed (.ci/setup installs Debian's nginx-light).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import free_port
from tests.support.signing import base_snapshot

TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "demo" / "nginx.conf.in"
_LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class Nginx:
    url: str  # http://127.0.0.1:PORT/
    root: Path  # the origin folder it serves
    prefix: Path  # pid, logs, temp files

    def requests(self, path: str) -> list[int]:
        """Status codes of the GET requests for ``path``, in order (from the access log)."""
        log = (self.prefix / "access.log").read_text(encoding="utf-8")
        return [
            int(m["status"])
            for m in map(_LOG_LINE.search, log.splitlines())
            if m and m["method"] == "GET" and m["path"] == path
        ]

    def headers(self, path: str) -> tuple[int, dict[str, str]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if binary is None:
        pytest.skip("nginx is not installed (.ci/setup installs nginx-light)")
    prefix = tmp_path / "nginx"
    root = tmp_path / "origin"
    prefix.mkdir()
    root.mkdir()
    port = free_port()
    text = TEMPLATE.read_text(encoding="utf-8")
    values = {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "ROOT": str(root),
        "USER": pwd.getpwuid(os.getuid()).pw_name,
        "RATE": "0",
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert "@" not in re.sub(r"#.*", "", text), "a placeholder was left in the config"
    (prefix / "nginx.conf").write_text(text, encoding="utf-8")
    with (prefix / "nginx.out").open("wb") as out:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((prefix / "nginx.out").read_text(errors="replace"))
            time.sleep(0.05)
        yield Nginx(url=f"http://127.0.0.1:{port}/", root=root, prefix=prefix)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


class Network:
    """The network's side through the real CLI: one key, root 1, ``publish``."""

    def __init__(self, folder: Path, origin: Path) -> None:
        self.folder = folder
        self.origin = origin
        folder.mkdir()
        self.key = folder / "net.key"
        self._cli("keygen", str(folder / "net"))
        self.root_file = origin / "root" / "1.json"
        self._cli(
            *("root", "--version", "1", "--network", "testnet", "--threshold", "1"),
            *("--public", str(folder / "net.pub"), "--key", str(self.key)),
            *("--out", str(self.root_file)),
        )
        self.published = 0

    def _cli(self, *args: str) -> str:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def publish(self, *, max_tokens: int = 4096) -> str:
        """Publish a snapshot; returns its config digest."""
        self.published += 1
        body = base_snapshot()
        body["jobs"]["max_tokens"] = max_tokens
        path = self.folder / f"snapshot-{self.published}.json"
        path.write_text(json.dumps(body), encoding="utf-8")
        output = self._cli(
            "publish", "--origin", str(self.origin), "--key", str(self.key), str(path)
        )
        return output.split()[-1]


@pytest.fixture
def network(tmp_path: Path, nginx: Nginx) -> Network:
    return Network(tmp_path / "network", nginx.root)


def test_node_fetches_through_nginx_and_a_second_poll_is_answered_304(
    nginx: Nginx, network: Network, make_node: Callable[..., NodeUnderTest]
) -> None:
    digest = network.publish()
    node = make_node(nginx.url, network.root_file.read_bytes())
    first = node.fetch().ok()
    assert f"({digest}) is the new HEAD" in first.stdout
    second = node.fetch().ok()
    assert "not modified" in second.stdout
    assert nginx.requests("/head.json") == [200, 304]
    assert nginx.requests(f"/snapshots/{digest.removeprefix('sha256:')}.json") == [200]
    # Each poll also asks for the next root, and nginx says there is none.
    assert nginx.requests("/root/2.json") == [404, 404]
    assert node.status()["head"]["digest"] == digest


def test_a_new_head_published_in_the_same_second_is_not_hidden_by_nginx_etag(
    nginx: Nginx, network: Network, make_node: Callable[..., NodeUnderTest]
) -> None:
    """nginx's ETag is (mtime in seconds, size). Two heads of the same size written within one
    second would share it, and a node that polled between them would be told 304 until the
    next publish. ``reconcile publish`` makes head.json's mtime advance to prevent that."""
    network.publish(max_tokens=4096)
    node = make_node(nginx.url, network.root_file.read_bytes())
    node.fetch().ok()
    second = network.publish(max_tokens=2048)  # same length, same second as far as possible
    result = node.fetch().ok()
    assert f"({second}) is the new HEAD" in result.stdout
    assert nginx.requests("/head.json") == [200, 200]


def test_cache_headers_are_the_documented_ones(nginx: Nginx, network: Network) -> None:
    digest = network.publish()
    status, head = nginx.headers("head.json")
    assert status == 200
    assert head["cache-control"] == "no-cache"
    assert head["etag"]
    status, snapshot = nginx.headers(f"snapshots/{digest.removeprefix('sha256:')}.json")
    assert status == 200
    assert snapshot["cache-control"] == "public, max-age=31536000, immutable"
    assert snapshot["content-type"] == "application/json"
    status, root = nginx.headers("root/1.json")
    assert (status, root["cache-control"]) == (200, "public, max-age=31536000, immutable")
    # A root not published yet must not be cached for a year by anything in between.
    status, missing = nginx.headers("root/2.json")
    assert status == 404
    assert "cache-control" not in missing
    # Half-written files of an atomic publish are never served.
    (nginx.root / ".head.json.abc.tmp").write_bytes(b"{}")
    assert nginx.headers(".head.json.abc.tmp")[0] == 404
