"""Mirrors that want credentials, on 127.0.0.1, for the tests of ``mirror_auth_file``.

* ``start_basic_nginx``: nginx serving a folder behind ``auth_basic`` (an htpasswd file
  with one ``{SSHA}`` line, which nginx-light reads without any tool to make it), logging
  each request's status, body bytes and ``Range`` like ``bench.nginx_origin``. Returns None
  when nginx is not installed.
* ``TokenGate``: a plain ``http.server`` standing in for a model hub's ``resolve`` endpoint.
  A request carrying ``Authorization: Bearer <token>`` is answered with a 302 to the same
  path on another server (the CDN stand-in, a ``FileServer`` on another port, which records
  the headers it got) with a presigned-looking query; anything else gets a 401. It records
  the headers of every request it saw.

Nothing here may listen beyond 127.0.0.1; servers are stopped by the tests that start them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.nginx_origin import NginxOrigin, launch_nginx
from tests.support.podman_fixtures import free_port

__all__ = ["TokenGate", "htpasswd_ssha", "start_basic_nginx"]

_BASIC = """  access_log {prefix}/access.log sent;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    auth_basic "models";
    auth_basic_user_file {htpasswd};
  }}"""


def htpasswd_ssha(user: str, password: str) -> str:
    """``user:{SSHA}base64(sha1(password + salt) + salt)``, a scheme nginx documents."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return f"{user}:{{SSHA}}{base64.b64encode(digest + salt).decode()}"


def start_basic_nginx(root: Path, prefix: Path, *, user: str, password: str) -> NginxOrigin | None:
    """nginx serving ``root`` to ``user``/``password`` only; its files live in ``prefix``."""
    prefix.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = prefix / "htpasswd"
    htpasswd.write_text(htpasswd_ssha(user, password) + "\n", encoding="utf-8")
    port = free_port()
    http = _BASIC.format(prefix=prefix, port=port, root=root, htpasswd=htpasswd)
    process = launch_nginx(prefix, port=port, http=http, connections=128)
    return None if process is None else NginxOrigin(process, port, root, prefix)


class _GateHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GateServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        gate = self.server
        headers = {k.lower(): v for k, v in self.headers.items()}
        with gate.lock:
            gate.seen.append((self.path, headers))
        path = self.path.split("?", 1)[0]
        if headers.get("authorization") == f"Bearer {gate.token}":
            self.send_response(302)
            self.send_header("Location", f"{gate.cdn.rstrip('/')}{path}?{gate.query}")
            body = b"found\n"
        else:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="models"')
            body = b"unauthorized\n"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _GateServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, *, token: str, cdn: str, query: str) -> None:
        self.token = token
        self.cdn = cdn
        self.query = query
        self.lock = threading.Lock()
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", 0), _GateHandler)


class TokenGate:
    """See the module docstring; ``url`` ends with ``/``, ``seen`` lists (path, headers)."""

    def __init__(self, *, token: str, cdn: str, query: str) -> None:
        self._server = _GateServer(token=token, cdn=cdn, query=query)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def seen(self) -> list[tuple[str, dict[str, str]]]:
        with self._server.lock:
            return list(self._server.seen)

    def __enter__(self) -> TokenGate:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()
