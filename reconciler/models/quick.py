"""A small model file in one request, held in memory until its digest matched.

Where it sits: ``download_file`` (``reconciler.models.download``) tries this first for a file
of at most ``QUICK_BYTES`` on an HTTP mirror. Installing a thousand small files costs round
trips and interpreter work per file, not bandwidth, so the happy path is kept to one request
on a pooled (keep-alive) connection, one hash, one ``open`` + ``writev`` + ``close`` of the
partial: no partial state to resume, no writer, no fsync (the store syncs a whole batch before
its index vouches for it, see ``Index.save``).

What it guarantees: the partial is written only once every byte arrived, the count is the
declared size and the SHA-256 matched; otherwise nothing is written and the caller's full path
(which resumes, tries every mirror, and words the error) takes over.

What it may not do: retry, choose between mirrors, raise an httpx exception, or write
anything but ``dest``. Memory: at most ``QUICK_BYTES`` per call.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from reconciler.models.mirrors import mirror_tally
from reconciler.models.wire import content_length

__all__ = ["QUICK_BYTES", "Whole", "fetch_whole", "timeout_until"]

QUICK_BYTES = 2 * 1024 * 1024  # files up to this size are held in memory until verified
_HEADERS = {"Accept-Encoding": "identity"}
_DONE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


@dataclass(frozen=True)
class Whole:
    """How the one request went: ``done`` (the partial holds the verified file), else the
    answer of a mirror that refused the request's credentials (401, 403: asking it again for
    this file would not change that), else nothing to say (the full path takes over)."""

    done: bool
    refusal: httpx.Response | None = None


def fetch_whole(
    client: httpx.Client,
    *,
    url: str,
    dest: Path,
    size: int,
    want: str,
    timeout: httpx.Timeout,
    durable: bool,
) -> Whole:
    """One GET of ``url``; done when ``dest`` holds its body, exactly the declared file.
    ``OSError`` from writing ``dest`` propagates (the caller maps disk full)."""
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    got = 0
    try:
        with client.stream(
            "GET", url, headers=_HEADERS, timeout=timeout, follow_redirects=True
        ) as response:
            if not _plain_whole(response, size):
                _count(url, got=0, failed=response.status_code != 200)
                refused = response.status_code in (401, 403)
                return Whole(done=False, refusal=response if refused else None)
            for data in response.iter_raw():
                got += len(data)
                if got > size:
                    break
                digest.update(data)
                chunks.append(data)
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError):
        _count(url, got=got, failed=True)
        return _MISSED
    _count(url, got=got, failed=False)
    if got != size or digest.hexdigest() != want:
        return _MISSED  # the full path asks again and says what is wrong
    _write(dest, chunks, durable=durable)
    return Whole(done=True)


_MISSED = Whole(done=False)


def timeout_until(stop_at: float, *, connect_s: float, read_s: float) -> httpx.Timeout:
    """The request's timeouts, none past the file's deadline ``stop_at`` (monotonic)."""
    left = max(0.001, stop_at - time.monotonic())
    return httpx.Timeout(
        connect=min(connect_s, left),
        read=min(read_s, left),
        write=min(read_s, left),
        pool=min(connect_s, left),
    )


def _plain_whole(response: httpx.Response, size: int) -> bool:
    """A 200 with the identity encoding and no other length than the declared one."""
    if response.status_code != 200:
        return False
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = content_length(response)
    return encoding in ("", "identity") and (length is None or length == size)


def _count(url: str, *, got: int, failed: bool) -> None:
    tally = mirror_tally()
    if got:
        tally.received(url, got)
    if failed:
        tally.error(url)


def _write(dest: Path, chunks: list[bytes], *, durable: bool) -> None:
    try:
        fd = os.open(dest, _DONE_FLAGS, 0o644)
    except FileNotFoundError:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, _DONE_FLAGS, 0o644)
    try:
        rest = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        while rest:
            rest = rest[os.write(fd, rest) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
