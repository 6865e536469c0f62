"""The runtime edge's connection to Podman, and how podman-py's failures become the project's.

Workflow position: the bottom of ``reconciler.runtime``. Observing, pulling, the container
operations and the health gate all make their Podman API calls through one
``PodmanConnection``; this module is the only one that builds podman-py clients.

Every API call has a timeout (podman-py's default is to wait forever): ``timeout_s`` for
ordinary calls, ``pull_timeout_s`` for pulls, ``stop_timeout_s`` plus ``timeout_s`` for stop,
restart and remove, and the health check's own ``timeout_s`` through ``client_with_timeout``.

What it may not do: let a podman-py, requests or urllib3 exception out. ``guard`` and
``raise_mapped`` turn each into ``ContainerError`` (the service answered with an error status)
or ``PodmanUnavailableError`` (it could not be reached), with ``raise … from exc``; the
modules beside it that catch ``THIRD_PARTY`` themselves map what they catch the same way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, NoReturn

import urllib3.exceptions
from podman import PodmanClient
from podman.errors import APIError, PodmanError

from reconciler.core.errors import (
    ContainerError,
    PodmanUnavailableError,
    ReconcilerError,
    SettingsError,
)

__all__ = [
    "THIRD_PARTY",
    "PodmanConnection",
    "answered",
    "api_reason",
    "body_reason",
    "clip",
    "http_status",
    "timed_out",
]

# What a podman-py call can raise besides our own errors: APIError and every requests error are
# OSErrors; urllib3 may leak from streamed bodies; ValueError/KeyError from odd responses.
THIRD_PARTY = (OSError, PodmanError, urllib3.exceptions.HTTPError, ValueError, KeyError)
_MESSAGE_LIMIT = 300  # characters of a Podman or container message kept in an error line


class PodmanConnection:
    """The podman-py client of one Podman API service, with the timeouts its calls take."""

    def __init__(
        self, url: str, *, timeout_s: float, pull_timeout_s: float, stop_timeout_s: int
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.client = self._connect(timeout_s)
        self._by_timeout: dict[float, Any] = {}

    def _connect(self, timeout_s: float) -> Any:
        try:
            return PodmanClient(base_url=self.url, timeout=timeout_s)
        except (*THIRD_PARTY, TypeError) as exc:
            raise SettingsError(f"podman_url {self.url!r} is not usable: {_line(exc)}") from exc

    def client_with_timeout(self, timeout_s: float) -> Any:
        """A client whose every call times out after ``timeout_s`` (kept for reuse).

        For calls that take no timeout of their own, such as ``exec_run``.
        """
        client = self._by_timeout.get(timeout_s)
        if client is None:
            client = self._by_timeout[timeout_s] = self._connect(timeout_s)
        return client

    def close(self) -> None:
        for client in (self.client, *self._by_timeout.values()):
            with contextlib.suppress(*THIRD_PARTY):
                client.close()
        self._by_timeout.clear()

    def ping(self) -> None:
        """Raise ``PodmanUnavailableError`` unless the service answers."""
        with self.guard("pinging the service"):
            ok = self.client.ping()
        if not ok:
            raise PodmanUnavailableError(f"Podman at {self.url} does not answer its ping")

    @property
    def stop_call_timeout_s(self) -> float:
        """How long a stop, restart or remove may take: the grace plus an ordinary call."""
        return self.stop_timeout_s + self.timeout_s

    def stop_params(self) -> dict[str, int]:
        # The libpod API of Podman 4 reads "timeout" for stop and restart (it ignores "t", and
        # a restart without it kills at once); later versions read "t" for restart. Both are
        # sent, unknown query keys are ignored.
        return {"timeout": self.stop_timeout_s, "t": self.stop_timeout_s}

    @contextlib.contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        """Map whatever podman-py raises while ``doing`` to the project's errors."""
        try:
            yield
        except ReconcilerError:
            raise
        except THIRD_PARTY as exc:
            self.raise_mapped(exc, doing)

    def raise_mapped(self, exc: BaseException, doing: str) -> NoReturn:
        if answered(exc):
            raise ContainerError(f"{doing}: Podman refused: {api_reason(exc)}") from exc
        raise PodmanUnavailableError(
            f"Podman at {self.url} unreachable while {doing}: {_root_reason(exc)}"
        ) from exc


# --- error details -------------------------------------------------------------------------


def http_status(exc: BaseException | None) -> int | None:
    """The HTTP status an error carries (podman-py's ``status_code``), if any."""
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def answered(exc: BaseException) -> bool:
    """Whether the service answered (an HTTP error status) rather than not being reached."""
    return isinstance(exc, APIError) and http_status(exc) is not None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes, and exceptions packed into their args (requests/urllib3 do that)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def timed_out(exc: BaseException) -> bool:
    """Whether a timeout is anywhere in the failure's chain (socket, urllib3 or requests)."""
    return any(
        isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError)
        or type(e).__name__.endswith("Timeout")
        for e in _chain(exc)
    )


def _root_reason(exc: BaseException) -> str:
    if timed_out(exc):
        return "timed out"
    *_, deepest = _chain(exc)
    return clip(str(deepest) or type(deepest).__name__)


def api_reason(exc: BaseException) -> str:
    """What Podman said when it refused, as one clipped line."""
    explanation = getattr(exc, "explanation", None)
    return clip(str(explanation or exc))


def body_reason(body: str) -> str:
    """The message of an error response body (libpod's JSON, or the text as it is)."""
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        if isinstance(data, dict):
            return clip(str(data.get("message") or data.get("cause") or body))
    return clip(body)


def clip(text: str) -> str:
    """``text`` on one line, cut to the length an error line may keep."""
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_LIMIT else line[: _MESSAGE_LIMIT - 1] + "…"


def _line(exc: BaseException) -> str:
    return clip(str(exc) or type(exc).__name__)
