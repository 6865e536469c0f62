"""Reading documents from the origin: HTTP(S) through httpx, or ``file://`` for air-gapped nodes.

Edge module: it returns bytes and never interprets them. httpx exceptions stay inside and
become ``OriginUnreachableError`` (transport: exit 5) or, for a body over its size limit,
``RejectedError`` (docs/contract.md §3.1: exit 4).

Policy, all enforced while reading (a hostile or broken origin must not hold the node):
* the size limit stops the read at limit + 1 bytes, whatever Content-Length says;
* ``Accept-Encoding: identity``; a compressed answer is refused (the signed bytes are the
  bytes on the wire);
* a connect timeout, a read timeout, and an overall deadline per document (a server that
  trickles one byte a second fails at the deadline);
* redirects are followed by hand, at most ``MAX_REDIRECTS``, never from https to http and
  never to another scheme.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from reconciler.core.errors import OriginUnreachableError, RejectedError

__all__ = ["MAX_REDIRECTS", "Origin", "OriginResponse"]

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class OriginResponse:
    status: int  # 200, 304 (not modified) or 404 (missing, when the caller allows it)
    body: bytes = b""
    etag: str | None = None


class Origin:
    def __init__(self, base_url: str, *, deadline_s: float = 30.0, connect_s: float = 10.0) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.scheme = urlsplit(self.base_url).scheme
        if self.scheme not in {"http", "https", "file"}:
            raise ValueError(f"origin scheme {self.scheme!r} is not http, https or file")
        self.deadline_s = deadline_s
        self._client: httpx.Client | None = None
        if self.scheme != "file":
            read = max(1.0, min(deadline_s / 3, 10.0))
            self._client = httpx.Client(
                timeout=httpx.Timeout(read, connect=min(connect_s, deadline_s)),
                follow_redirects=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "reconciler/1"},
                trust_env=False,
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url_of(self, path: str) -> str:
        return urljoin(self.base_url, path)

    def get(
        self, path: str, *, max_bytes: int, etag: str | None = None, missing_ok: bool = False
    ) -> OriginResponse:
        """Fetch ``path`` below the origin. 404/403 is returned only when ``missing_ok``."""
        if self._client is None:
            return self._get_file(path, max_bytes=max_bytes, missing_ok=missing_ok)
        return self._get_http(path, max_bytes=max_bytes, etag=etag, missing_ok=missing_ok)

    def _get_file(self, path: str, *, max_bytes: int, missing_ok: bool) -> OriginResponse:
        local = Path(unquote(urlsplit(self.url_of(path)).path))
        try:
            with local.open("rb") as handle:
                body = handle.read(max_bytes + 1)
        except FileNotFoundError:
            if missing_ok:
                return OriginResponse(status=404)
            raise OriginUnreachableError(path, f"{local} does not exist") from None
        except OSError as exc:
            raise OriginUnreachableError(path, f"cannot read {local}: {exc.strerror}") from exc
        if len(body) > max_bytes:
            raise RejectedError(path, f"larger than the {max_bytes}-byte limit")
        return OriginResponse(status=200, body=body)

    def _get_http(
        self, path: str, *, max_bytes: int, etag: str | None, missing_ok: bool
    ) -> OriginResponse:
        assert self._client is not None
        url = self.url_of(path)
        started = time.monotonic()
        headers = {"If-None-Match": etag} if etag else {}
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status in {301, 302, 303, 307, 308}:
                        url = self._redirect_target(path, url, response.headers.get("location"))
                        continue
                    if status == 304:
                        return OriginResponse(status=304, etag=etag)
                    if status in {403, 404, 410} and missing_ok:
                        return OriginResponse(status=404)
                    if status != 200:
                        raise OriginUnreachableError(path, f"HTTP {status} from {url}")
                    encoding = response.headers.get("content-encoding", "identity").lower()
                    if encoding not in {"identity", ""}:
                        raise OriginUnreachableError(path, f"answered with {encoding} encoding")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise RejectedError(path, f"larger than the {max_bytes}-byte limit")
                    body = self._read_bounded(path, response, max_bytes=max_bytes, started=started)
                    return OriginResponse(status=200, body=body, etag=response.headers.get("etag"))
            except httpx.TimeoutException as exc:
                raise OriginUnreachableError(path, f"timed out ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OriginUnreachableError(path, reason[:200]) from exc
        raise OriginUnreachableError(path, f"more than {MAX_REDIRECTS} redirects")

    def _redirect_target(self, path: str, url: str, location: str | None) -> str:
        if not location:
            raise OriginUnreachableError(path, "redirect without a Location")
        target = urljoin(url, location)
        new_scheme = urlsplit(target).scheme
        if new_scheme not in {"http", "https"} or (
            self.scheme == "https" and new_scheme != "https"
        ):
            raise OriginUnreachableError(path, f"refused redirect to {target[:120]}")
        return target

    def _read_bounded(
        self, path: str, response: httpx.Response, *, max_bytes: int, started: float
    ) -> bytes:
        chunks: list[bytes] = []
        received = 0
        # No chunk size: httpx would otherwise buffer until a whole chunk arrived, and a
        # server trickling a small document would never reach the deadline check.
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > max_bytes:
                raise RejectedError(path, f"larger than the {max_bytes}-byte limit")
            chunks.append(chunk)
            if time.monotonic() - started > self.deadline_s:
                raise OriginUnreachableError(path, f"not received within {self.deadline_s:g} s")
        return b"".join(chunks)
