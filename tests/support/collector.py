"""A report collector on 127.0.0.1: nginx's WebDAV module with docs/publishing.md's config.

The ``location`` block is read from docs/publishing.md (the block after the
``<!-- collector-config -->`` marker), with only its ``root`` pointed at a test folder, so
the configuration the documentation gives operators is the one the tests run. nginx runs
from a private prefix (``-p``, ``daemon off``, one process) and is stopped by its pid.
``start_collector`` returns None when nginx is not installed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench.nginx_origin import launch_nginx, stop_nginx
from tests.support.podman_fixtures import free_port

__all__ = ["Collector", "collector_location", "start_collector"]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "publishing.md"

_SERVER = """  access_log {prefix}/access.log;
  server {{
    listen 127.0.0.1:{port};
{location}
  }}"""


class Collector:
    """The running nginx; reports land in ``nodes`` and ``url`` is the report URL."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, root: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/reports/"
        self.nodes = root / "reports" / "nodes"

    def close(self) -> None:
        stop_nginx(self.process)


def collector_location() -> str:
    """The collector's ``location`` block as docs/publishing.md gives it."""
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(r"<!-- collector-config -->\s*```nginx\n(.*?)```", text, re.S)
    if found is None:
        raise AssertionError("docs/publishing.md has no collector-config block")
    return found.group(1)


def start_collector(root: Path, prefix: Path) -> Collector | None:
    """nginx storing PUTs under ``root/reports/nodes/``."""
    (root / ".tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    location = collector_location().replace("root /srv;", f"root {root};")
    assert f"root {root};" in location, "the documented block no longer sets `root /srv;`"
    http = _SERVER.format(prefix=prefix, port=port, location=location)
    process = launch_nginx(prefix, port=port, http=http, connections=64, body_temp=root / ".tmp")
    return None if process is None else Collector(process, port, root)
