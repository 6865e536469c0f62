"""What a mirror's HTTP answer says, in the words logs and errors use.

Where it sits: shared by the two ways a file is downloaded (``reconciler.models.download``,
one stream; ``reconciler.models.segmented``, byte ranges over several connections): reading
``Content-Length`` and ``Content-Range``, naming an httpx failure or a status in one short
line (a 401/403 in the words of ``reconciler.models.mirror_auth``), and showing a URL
without its secrets (user, password, query: presigned URLs carry their signature there).

What it may not do: send anything or decide what to do with an answer.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from reconciler.models.mirror_auth import refusal

__all__ = [
    "connection_cutter",
    "content_length",
    "content_range",
    "describe",
    "redact",
    "status_text",
    "timeout_kind",
]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Anything that looks like an absolute URL inside an exception's text.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def status_text(response: httpx.Response) -> str:
    """A status a download cannot use, as a failure reason: ``HTTP 404``, or for 401 and
    403 the host and whether credentials were missing or refused."""
    if response.status_code in (401, 403):
        return refusal(response)
    return f"HTTP {response.status_code}"


def content_length(response: httpx.Response) -> int | None:
    text = response.headers.get("Content-Length")
    if text is None or not text.strip().isdigit():
        return None
    return int(text)


def content_range(response: httpx.Response) -> tuple[int, int, int | None] | None:
    """(first, last, total or None for ``*``) of a 206, or None if it has no usable one."""
    found = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    if found is None:
        return None
    total = found.group(3)
    return int(found.group(1)), int(found.group(2)), None if total == "*" else int(total)


def connection_cutter(response: httpx.Response) -> Callable[[], None] | None:
    """A function that ends ``response``'s connection from another thread, or None if the
    transport does not expose its socket (then only the read timeout ends a silent body).

    ``shutdown`` wakes a thread blocked reading the socket (``close`` would not); httpx then
    raises in that thread and throws the connection away instead of pooling it. The plain
    socket's method is called even under TLS: the reader sees an end of stream either way.
    """
    stream = response.extensions.get("network_stream")
    get_extra_info = getattr(stream, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if not isinstance(sock, socket.socket):
        return None

    def cut() -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    return cut


def timeout_kind(exc: httpx.TimeoutException) -> str:
    kinds = {
        httpx.ConnectTimeout: "connect",
        httpx.ReadTimeout: "no data",
        httpx.WriteTimeout: "write",
        httpx.PoolTimeout: "pool",
    }
    return kinds.get(type(exc), "timeout")


def describe(exc: Exception) -> str:
    """An exception in one line of at most 200 characters, any URL in it redacted."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _URL_IN_TEXT.sub(lambda found: redact(found.group(0)), text)
    return f"{type(exc).__name__}: {text}"[:200]


def redact(url: str) -> str:
    """A URL fit for logs: no credentials, no query (presigned URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address: urlsplit gave it without its brackets
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
