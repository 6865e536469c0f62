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
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.podman_fixtures import free_port

__all__ = ["NginxOrigin", "start_nginx"]

_CONFIG = """daemon off;
master_process off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  types {{ application/json json; }}
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


class NginxOrigin:
    def __init__(self, process: subprocess.Popen[bytes], port: int, root: Path) -> None:
        self.process = process
        self.port = port
        self.root = root
        self.url = f"http://127.0.0.1:{port}/"

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_nginx(root: Path, prefix: Path) -> NginxOrigin | None:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None
    )
    if binary is None:
        return None
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Workers would otherwise switch to "nobody", who cannot enter a 0700 scratch folder.
    user = "user root;" if os.geteuid() == 0 else ""
    config = prefix / "nginx.conf"
    config.write_text(
        _CONFIG.format(user=user, prefix=prefix, port=port, root=root), encoding="utf-8"
    )
    log = (prefix / "stderr.log").open("wb")
    process = subprocess.Popen(
        [binary, "-c", str(config), "-p", str(prefix)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return NginxOrigin(process, port, root)
        time.sleep(0.05)
    origin = NginxOrigin(process, port, root)
    origin.close()
    tail = (prefix / "stderr.log").read_text(errors="replace")[-500:]
    raise RuntimeError(f"nginx did not start: {tail}")
