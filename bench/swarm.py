"""Six nodes install one model together from one capped web seed: what the origin serves,
and how long the last node takes against one node alone (issue 14).

The web seed is nginx on 127.0.0.1 with ``limit_rate`` and a small socket send buffer: nginx
caps each *request*, and a web seed (BEP 19) makes many short Range requests, each of which
would otherwise start with a burst as large as the kernel's send buffer, far above the cap.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.nginx_origin import NginxOrigin, nginx_binary, run_nginx
from tests.support.podman_fixtures import free_port

__all__ = ["start_web_seed"]

_CONFIG = """daemon off;
master_process off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
  log_format sent '$status $body_bytes_sent "$http_range"';
  access_log {prefix}/access.log sent;
  sendfile on;
  sendfile_max_chunk 256k;
  keepalive_requests 100000;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port} sndbuf=128k; root {root}; limit_rate {limit_rate}; }}
}}
"""


def start_web_seed(root: Path, prefix: Path, *, limit_rate: str) -> NginxOrigin | None:
    """nginx serving ``root`` with every request capped at ``limit_rate`` (nginx syntax) and
    its body bytes logged; None when nginx is not installed."""
    binary = nginx_binary()
    if binary is None:
        return None
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = prefix / "nginx.conf"
    config.write_text(
        _CONFIG.format(
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix,
            port=port,
            root=root,
            limit_rate=limit_rate,
        ),
        encoding="utf-8",
    )
    return NginxOrigin(run_nginx(binary, config, prefix, port), port, root, prefix)
