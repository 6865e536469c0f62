"""A real HTTP/1.1 file server on 127.0.0.1 with faults a test switches on at run time.

Tests use it as the network: the model mirrors and the signed origin (``head.json``,
``snapshots/…``, ``root/N.json``) are plain files under ``root``. It speaks real HTTP over a
real socket, so client code is exercised through its whole stack (httpx, h11, the kernel);
nothing is mocked.

What it adds to a static file server:

* ``ETag`` on every file and ``If-None-Match`` → 304; ``Range: bytes=N-`` (and ``N-M``) → 206
  with ``Content-Range``; a range past the end → 416.
* Faults per URL path (``server.faults.set("/a.bin", Fault(cut_after=100))``): a status, a
  redirect (also to itself: a loop), a connection cut after N body bytes, a stall, a trickle,
  an endless body, other bytes than the file's, a body longer than its ``Content-Length``, a
  206 at the wrong offset, a 200 that ignores ``Range``. ``times=`` makes a fault one-shot.
* Counters per path: requests, body bytes actually written to the socket, status codes and
  the request headers seen (names lower-cased).

It may not touch anything outside ``root`` and shuts down promptly even while clients are
stalled: stalls wait on an event that ``close()`` sets, and open connections are shut down.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Fault", "FaultTable", "FileServer", "ServerStats"]

_SEND_CHUNK = 256 * 1024  # bytes per socket write when nothing slows the body down
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Fault:
    """How to misbehave on one path. Fields combine; the defaults are "behave"."""

    status: int | None = None  # answer with this status and a short text body
    redirect: str | None = None  # 302 to this URL (absolute, or relative to the request)
    stall_headers: bool = False  # read the request, never answer (until the server closes)
    cut_after: int | None = None  # close the connection after this many body bytes
    stall_after: int | None = None  # after this many body bytes send nothing more
    trickle_s: float | None = None  # send the body one byte every trickle_s seconds
    endless: bool = False  # a body that never ends (no Content-Length)
    body: bytes | None = None  # serve these bytes instead of the file's
    extra: bytes = b""  # appended to the body (and counted in Content-Length)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection does
    declared_length: int | None = None  # a Content-Length that lies about the body
    ignore_range: bool = False  # answer a Range request with 200 and the whole body
    range_shift: int = 0  # answer a Range request with a 206 starting this far off
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (name, value)
    times: int | None = None  # applies to this many requests, then disappears


class FaultTable:
    """Faults by URL path, set and cleared by the test while the server runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._queued: dict[str, list[Fault]] = {}

    def set(self, path: str, fault: Fault | None = None, **fields: Any) -> None:
        """``set("/a", Fault(status=404))`` or ``set("/a", status=404)``."""
        chosen = replace(fault or Fault(), **fields)
        with self._lock:
            self._faults[_normal_path(path)] = chosen

    def queue(self, path: str, *faults: Fault) -> None:
        """One fault per coming request on ``path``, in order (``Fault()`` = behave); once
        they are used up, whatever ``set`` put there applies again."""
        with self._lock:
            self._queued.setdefault(_normal_path(path), []).extend(faults)

    def clear(self, path: str | None = None) -> None:
        with self._lock:
            if path is None:
                self._faults.clear()
                self._queued.clear()
            else:
                self._faults.pop(_normal_path(path), None)
                self._queued.pop(_normal_path(path), None)

    def take(self, path: str) -> Fault | None:
        """The fault for one request on ``path``: the next queued one, else the one set
        (counting down its ``times``)."""
        with self._lock:
            queued = self._queued.get(path)
            if queued:
                return queued.pop(0)
            fault = self._faults.get(path)
            if fault is None or fault.times is None:
                return fault
            if fault.times <= 1:
                del self._faults[path]
            else:
                self._faults[path] = replace(fault, times=fault.times - 1)
            return fault


@dataclass
class _PathCounters:
    requests: int = 0
    body_bytes: int = 0
    statuses: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class ServerStats:
    """What the server saw and sent, per URL path (``/blobs/a.bin``; leading ``/`` optional)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, _PathCounters] = {}

    def requests(self, path: str) -> int:
        with self._lock:
            return self._get(path).requests

    def body_bytes(self, path: str) -> int:
        with self._lock:
            return self._get(path).body_bytes

    def statuses(self, path: str) -> list[int]:
        with self._lock:
            return list(self._get(path).statuses)

    def headers(self, path: str) -> list[dict[str, str]]:
        """Request headers of each request on ``path``, in order, names lower-cased."""
        with self._lock:
            return [dict(h) for h in self._get(path).headers]

    def total_requests(self) -> int:
        with self._lock:
            return sum(c.requests for c in self._paths.values())

    def total_body_bytes(self) -> int:
        with self._lock:
            return sum(c.body_bytes for c in self._paths.values())

    def reset(self) -> None:
        with self._lock:
            self._paths.clear()

    def _get(self, path: str) -> _PathCounters:
        return self._paths.get(_normal_path(path), _PathCounters())

    def _request(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            counters = self._paths.setdefault(path, _PathCounters())
            counters.requests += 1
            counters.headers.append(headers)

    def _status(self, path: str, status: int) -> None:
        with self._lock:
            self._paths.setdefault(path, _PathCounters()).statuses.append(status)

    def _sent(self, path: str, count: int) -> None:
        with self._lock:
            self._paths.setdefault(path, _PathCounters()).body_bytes += count


def _normal_path(path: str) -> str:
    return "/" + path.lstrip("/")


class _ClientGoneError(Exception):
    """The client closed its end, or the server is closing: stop sending."""


@dataclass(frozen=True)
class _Body:
    """A body to send: ``length`` bytes readable by offset, or endless."""

    length: int
    read: Callable[[int, int], bytes]  # (offset, count) -> at most count bytes
    etag: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, *, send_body: bool) -> None:
        path = _normal_path(unquote(urlsplit(self.path).path))
        stats = self.server.stats
        stats._request(path, {k.lower(): v for k, v in self.headers.items()})
        fault = self.server.faults.take(path)
        try:
            self._answer(path, fault or Fault(), send_body=send_body)
        except _ClientGoneError:
            self.close_connection = True

    def _answer(self, path: str, fault: Fault, *, send_body: bool) -> None:
        stats = self.server.stats
        if fault.stall_headers:
            self._wait(None)
            raise _ClientGoneError
        if fault.redirect is not None:
            self._simple(path, 302, b"moved\n", location=fault.redirect)
            return
        if fault.status is not None:
            self._simple(path, fault.status, f"status {fault.status}\n".encode())
            return
        body = self._body(path, fault)
        if body is None:
            self._simple(path, 404, b"not found\n")
            return
        if body.etag in _etags(self.headers.get("If-None-Match", "")):
            stats._status(path, 304)
            self.send_response(304)
            self.send_header("ETag", body.etag)
            self.end_headers()
            return

        status, start, end = 200, 0, body.length
        asked = _RANGE.match(self.headers.get("Range", "").strip())
        if asked and not fault.ignore_range and not fault.endless:
            first = int(asked.group(1))
            last = int(asked.group(2)) if asked.group(2) else body.length - 1
            if first >= body.length:
                self._simple(path, 416, b"", content_range=f"bytes */{body.length}")
                return
            status = 206
            start = max(0, first + fault.range_shift)
            end = min(body.length, last + 1)

        close = fault != Fault() or not fault.send_length
        stats._status(path, status)
        self.send_response(status)
        self.send_header("Content-Type", _content_type(path))
        self.send_header("ETag", body.etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{body.length}")
        if fault.declared_length is not None:
            self.send_header("Content-Length", str(fault.declared_length))
        elif fault.send_length and not fault.endless:
            self.send_header("Content-Length", str(end - start))
        for name, value in fault.headers:
            self.send_header(name, value)
        if close:
            # A misbehaving answer must not leave bytes behind for the next request.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if send_body:
            self._send(path, fault, body, start=start, end=end)

    def _body(self, path: str, fault: Fault) -> _Body | None:
        if fault.endless:
            pattern = (b"endless-" * 8192)[:_SEND_CHUNK]
            return _Body(length=-1, read=lambda _offset, count: pattern[:count], etag='"endless"')
        if fault.body is not None:
            data = fault.body + fault.extra
            tag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            return _Body(length=len(data), read=lambda o, n: data[o : o + n], etag=tag)
        file = self.server.resolve(path)
        if file is None:
            return None
        info = file.stat()
        extra = fault.extra
        size = info.st_size

        def read(offset: int, count: int) -> bytes:
            if offset >= size:
                return extra[offset - size : offset - size + count]
            with file.open("rb") as handle:
                handle.seek(offset)
                return handle.read(min(count, size - offset))

        tag = f'"{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ino:x}"'
        if extra:
            tag = tag[:-1] + f'-x{len(extra)}"'
        return _Body(length=size + len(extra), read=read, etag=tag)

    def _send(self, path: str, fault: Fault, body: _Body, *, start: int, end: int) -> None:
        endless = body.length < 0
        offset = start
        sent = 0
        limit = fault.cut_after if fault.cut_after is not None else fault.stall_after
        while endless or offset < end:
            step = 1 if fault.trickle_s is not None else _SEND_CHUNK
            if not endless:
                step = min(step, end - offset)
            if limit is not None:
                if sent >= limit:
                    break
                step = min(step, limit - sent)
            data = body.read(offset, step)
            if not data:
                break
            self._write(path, data)
            offset += len(data)
            sent += len(data)
            if fault.trickle_s is not None:
                self._wait(fault.trickle_s)
        if fault.stall_after is not None and sent >= fault.stall_after:
            self._wait(None)
            raise _ClientGoneError
        if fault.cut_after is not None and sent >= fault.cut_after:
            self._hang_up()
            raise _ClientGoneError

    def _write(self, path: str, data: bytes) -> None:
        if self.server.closing.is_set():
            raise _ClientGoneError
        try:
            self.wfile.write(data)
        except OSError as exc:  # the client went away: a normal end for a faulty transfer
            raise _ClientGoneError from exc
        self.server.stats._sent(path, len(data))

    def _wait(self, seconds: float | None) -> None:
        if self.server.closing.wait(seconds):
            raise _ClientGoneError

    def _hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _simple(
        self,
        path: str,
        status: int,
        text: bytes,
        *,
        location: str | None = None,
        content_range: str | None = None,
    ) -> None:
        self.server.stats._status(path, status)
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if self.command != "HEAD":
            self._write(path, text)


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",") if part.strip()}


def _content_type(path: str) -> str:
    return "application/json" if path.endswith(".json") else "application/octet-stream"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path, address: tuple[str, int]) -> None:
        self.root = root.resolve()
        self.faults = FaultTable()
        self.stats = ServerStats()
        self.closing = threading.Event()
        self._live_lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        super().__init__(address, _Handler)

    def resolve(self, path: str) -> Path | None:
        """The served file for a URL path, or None (missing, a folder, or outside root)."""
        candidate = (self.root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._live_lock:
            self._live.add(request)
            self._handlers = [t for t in self._handlers if t.is_alive()]
            thread = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"fileserver-{client_address[1]}",
                daemon=True,
            )
            self._handlers.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._live_lock:
            self._live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request is normal here; stay quiet."""

    def stop_clients(self, timeout_s: float) -> None:
        self.closing.set()
        with self._live_lock:
            live = list(self._live)
            threads = list(self._handlers)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        stop_by = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, stop_by - time.monotonic()))


class FileServer:
    """Serves ``root`` on 127.0.0.1 from a background thread; see the module docstring."""

    def __init__(self, root: Path, *, port: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = _Server(self.root, ("127.0.0.1", port))
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.faults = self._server.faults
        self.stats = self._server.stats
        self._thread: threading.Thread | None = None

    def url_for(self, path: str) -> str:
        return self.url + path.lstrip("/")

    def write(self, path: str, data: bytes) -> Path:
        """Put a file under root (atomically, so a concurrent request sees old or new)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        scratch.write_bytes(data)
        scratch.replace(target)
        return target

    def start(self) -> FileServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fileserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self, *, timeout_s: float = 5.0) -> None:
        """Stop accepting, release stalled handlers, hang up on clients, free the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout_s)
            self._thread = None
        self._server.stop_clients(timeout_s)
        self._server.server_close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
