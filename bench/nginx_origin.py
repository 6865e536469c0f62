"""nginx serving a folder on 127.0.0.1: the stock origin the download benchmark uses.

The test suite's ``FileServer`` is a Python server; it tops out near 200 MB/s on this machine
and would make every client look alike. nginx (``sendfile``) is what an origin or mirror
runs, so the client's own costs show. One process (``master_process off``), its files in a
private prefix folder, stopped by its pid. ``start_nginx`` returns None when nginx is not
installed, and the caller falls back to ``FileServer``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.podman_fixtures import free_port

__all__ = [
    "NginxOrigin",
    "launch_nginx",
    "nginx_binary",
    "run_nginx",
    "start_nginx",
    "stop_nginx",
]

# What every nginx started here shares: one process in the foreground, its pid, logs and
# temporary folders in a private prefix; the caller's ``http`` lines follow. ``sent`` logs a
# request's status, body bytes, ``Range`` and connection serial (``NginxOrigin.requests``).
_PREAMBLE = """daemon off;
master_process off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  log_format sent '$status $body_bytes_sent "$http_range" $connection';
  client_body_temp_path {body_temp};
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
{http}
}}
"""

_ORIGIN = """  {access_log}
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000;
  types {{ application/json json; }}
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; {limit} }}"""


# A line of the ``sent`` log format; configs written elsewhere may lack the connection.
_LOGGED = re.compile(r'^(?P<status>\d+) (?P<sent>\d+) "(?P<range>[^"]*)"(?: (?P<connection>\d+))?$')


class NginxOrigin:
    def __init__(
        self, process: subprocess.Popen[bytes], port: int, root: Path, prefix: Path
    ) -> None:
        self.process = process
        self.port = port
        self.root = root
        self._log = prefix / "access.log"
        self.url = f"http://127.0.0.1:{port}/"

    def requests(self) -> list[tuple[int, int, str]]:
        """(status, body bytes sent, Range asked) per finished request (with ``log_bytes``)."""
        try:
            lines = self._log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        rows = []
        for line in lines:
            found = _LOGGED.match(line)
            if found is not None:
                rows.append((int(found["status"]), int(found["sent"]), found["range"]))
        return rows

    def connections(self) -> set[int]:
        """The serial numbers of the TCP connections the logged requests came on."""
        try:
            lines = self._log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return set()
        found = (_LOGGED.match(line) for line in lines)
        return {int(f["connection"]) for f in found if f is not None and f["connection"]}

    def body_bytes_sent(self) -> int:
        return sum(sent for _status, sent, _range in self.requests())

    def reset_log(self) -> None:
        if self._log.exists():
            # nginx keeps its descriptor open (O_APPEND): truncating starts the log afresh.
            os.truncate(self._log, 0)

    def close(self) -> None:
        stop_nginx(self.process)


def nginx_binary() -> str | None:
    """Debian's nginx, on PATH or in /usr/sbin (not on a non-root PATH)."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None
    )


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: one process, so its pid is all of it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def run_nginx(binary: str, config: Path, prefix: Path, port: int) -> subprocess.Popen[bytes]:
    """Start nginx on ``config`` and wait (10 s) until ``port`` answers; else stop it and
    raise with the tail of its stderr."""
    with (prefix / "stderr.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "-c", str(config), "-p", str(prefix)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    stop_nginx(process)
    tail = (prefix / "stderr.log").read_text(errors="replace")[-800:]
    raise RuntimeError(f"nginx did not start: {tail}")


def launch_nginx(
    prefix: Path,
    *,
    port: int,
    http: str,
    connections: int = 512,
    body_temp: Path | None = None,
) -> subprocess.Popen[bytes] | None:
    """nginx with the shared preamble and the ``http`` block's own lines (``http`` listens on
    ``port``), its files in ``prefix``; running once ``port`` answers. None when nginx is
    not installed. ``body_temp`` holds request bodies (default ``prefix/body``)."""
    binary = nginx_binary()
    if binary is None:
        return None
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(
        _PREAMBLE.format(
            # Workers would otherwise switch to "nobody", who cannot enter a 0700 scratch folder.
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix,
            connections=connections,
            body_temp=body_temp or prefix / "body",
            http=http,
        ),
        encoding="utf-8",
    )
    return run_nginx(binary, config, prefix, port)


def start_nginx(
    root: Path, prefix: Path, *, limit_rate: str | None = None, log_bytes: bool = False
) -> NginxOrigin | None:
    """nginx serving ``root``; ``limit_rate`` (nginx syntax, e.g. ``16m``) caps each
    connection, as CDNs and model hubs do; ``log_bytes`` logs the body bytes of every
    request (``NginxOrigin.body_bytes_sent``)."""
    port = free_port()
    http = _ORIGIN.format(
        port=port,
        root=root,
        limit=f"limit_rate {limit_rate};" if limit_rate else "",
        access_log=f"access_log {prefix}/access.log sent;" if log_bytes else "access_log off;",
    )
    process = launch_nginx(prefix, port=port, http=http)
    return None if process is None else NginxOrigin(process, port, root, prefix)
