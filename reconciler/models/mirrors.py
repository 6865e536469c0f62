"""The mirrors of one file during a segmented download: which to ask next, which to drop;
and the node-wide tally of bytes and errors per mirror host, for the metrics.

Where it sits: the segmented download (``reconciler.models.segmented``) asks its
``MirrorBoard`` for a mirror before each request and tells it how the request went. Faster
mirrors get more segments (each new segment goes to the mirror with the best expected rate per
connection in use); local mirrors are preferred while they work; a mirror that fails
``mirror_errors`` times in a row, answers with a permanent refusal (403, 404, 410) or serves
wrong bytes is dropped for this file (the only mirror after ``mirror_errors`` wrong answers);
a stall counts only while another mirror could take
over (the file's only mirror is asked again, within the file's deadline). A mirror that answers
a ``Range`` request with the whole file is kept only for whole-file downloads.

The tally lives in the process; at the end of each fetch the fetcher adds what it counted to
``models/.mirrors.json`` (``add_mirror_totals``), which the metrics writer reads
(``read_mirror_totals``), so the counters keep growing across ``once`` processes.

What it may not do: contact a mirror, or touch a file other than that one. It keeps score.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler.disk.atomic import write_atomic

__all__ = [
    "Mirror",
    "MirrorBoard",
    "MirrorTally",
    "MirrorTotals",
    "add_mirror_totals",
    "mirror_host",
    "mirror_tally",
    "read_mirror_totals",
]

_LOCAL_BONUS = 4.0  # a LAN cache is worth asking first even before its rate is known
_UNKNOWN_RATE = 1e12  # bytes/s assumed until a mirror has delivered: every mirror gets tried


def mirror_host(url: str) -> str:
    """``scheme://host[:port]``: the label a mirror's figures are kept under (no path, query
    or credentials, which may be secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "invalid"
    return f"{parts.scheme}://{host}" if parts.scheme else "relative"


@dataclass
class Mirror:
    """One URL of one file and how it has done so far."""

    url: str
    shown: str  # the URL as logs may show it
    local: bool = False
    ranges: bool | None = None  # None until a Range request was answered
    active: int = 0  # requests in flight
    bytes: int = 0
    seconds: float = 0.0  # time spent receiving those bytes, summed over connections
    errors_in_row: int = 0  # failed requests in a row that delivered nothing
    wrong_answers: int = 0  # requests whose bytes failed a chunk digest
    dropped: str | None = None  # why, once dropped

    def rate(self) -> float:
        """Bytes per second per connection, as measured so far."""
        if self.seconds <= 0.05 or self.bytes <= 0:
            return _UNKNOWN_RATE
        return self.bytes / self.seconds


class MirrorBoard:
    """The mirrors of one file. Thread-safe."""

    def __init__(self, mirrors: list[Mirror], *, max_errors: int) -> None:
        self.mirrors = mirrors
        self._max_errors = max(1, max_errors)
        self._lock = threading.Lock()

    def choose(self, *, need_ranges: bool, avoid: Mirror | None = None) -> Mirror | None:
        """The mirror for the next request, counted as active; None if none is left."""
        with self._lock:
            live = [m for m in self.mirrors if m.dropped is None]
            if need_ranges:
                live = [m for m in live if m.ranges is not False]
            if avoid is not None and len(live) > 1:
                live = [m for m in live if m is not avoid]
            if not live:
                return None
            best = max(live, key=_expected)
            best.active += 1
            return best

    def done(self, mirror: Mirror, *, got: int, seconds: float) -> None:
        with self._lock:
            mirror.active -= 1
            mirror.bytes += got
            mirror.seconds += seconds
            if got > 0:
                mirror.errors_in_row = 0

    def failed(
        self,
        mirror: Mirror,
        reason: str,
        *,
        got: int,
        seconds: float,
        drop: bool = False,
        wrong: bool = False,
        stalled: bool = False,
    ) -> None:
        """A request failed; ``drop`` for a mirror that must not be asked again, ``wrong``
        when it sent bytes that failed a digest, ``stalled`` when it stopped sending. A
        request that delivered bytes before it failed still made progress: only failures
        without any count towards the drop. A stall of the file's only mirror is no error:
        dropping it would fail the file, while asking again may well work (the file's
        deadline bounds the whole), and a slow connection is not a broken mirror."""
        with self._lock:
            mirror.active -= 1
            mirror.bytes += got
            mirror.seconds += seconds
            if stalled and not self._others(mirror):
                return
            # A stall counts even after bytes came: the mirror stopped making any.
            clean = got > 0 and not (wrong or stalled)
            mirror.errors_in_row = 0 if clean else mirror.errors_in_row + 1
            mirror.wrong_answers += wrong
            # Bytes that failed a digest: while another mirror can serve, nothing more from
            # this one; the only mirror gets ``mirror_errors`` chances (a chunk may have been
            # damaged on the way).
            wrong_out = wrong and (self._others(mirror) or mirror.wrong_answers >= self._max_errors)
            if drop or wrong_out or mirror.errors_in_row >= self._max_errors:
                mirror.dropped = reason
        mirror_tally().error(mirror.url)

    def _others(self, mirror: Mirror) -> bool:
        """Whether another mirror could take this one's ranges (under the lock)."""
        return any(
            m is not mirror and m.dropped is None and m.ranges is not False for m in self.mirrors
        )

    def ranges_work(self, mirror: Mirror) -> None:
        with self._lock:
            mirror.ranges = True

    def no_ranges(self, mirror: Mirror) -> None:
        with self._lock:
            mirror.ranges = False

    def any_ranges(self) -> bool:
        with self._lock:
            return any(m.dropped is None and m.ranges is not False for m in self.mirrors)

    def live(self) -> list[Mirror]:
        with self._lock:
            return [m for m in self.mirrors if m.dropped is None]


def _expected(mirror: Mirror) -> float:
    bonus = _LOCAL_BONUS if mirror.local else 1.0
    return bonus * mirror.rate() / (mirror.active + 1)


class MirrorTally:
    """Bytes received from and errors of each mirror host since the process started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}
        self._errors: dict[str, int] = {}

    def received(self, url: str, count: int) -> None:
        host = mirror_host(url)
        with self._lock:
            self._bytes[host] = self._bytes.get(host, 0) + count

    def error(self, url: str) -> None:
        host = mirror_host(url)
        with self._lock:
            self._errors[host] = self._errors.get(host, 0) + 1

    def figures(self) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes per host, errors per host), copies."""
        with self._lock:
            return dict(self._bytes), dict(self._errors)

    def take(self) -> MirrorTotals:
        """What was counted since the last ``take``, and start again from zero."""
        with self._lock:
            taken = MirrorTotals(received=dict(self._bytes), errors=dict(self._errors))
            self._bytes.clear()
            self._errors.clear()
        return taken


@dataclass(frozen=True)
class MirrorTotals:
    """Bytes received from and errors of each mirror host (``scheme://host[:port]``)."""

    received: dict[str, int]  # bytes
    errors: dict[str, int]

    def plus(self, other: MirrorTotals) -> MirrorTotals:
        return MirrorTotals(
            received=_summed(self.received, other.received),
            errors=_summed(self.errors, other.errors),
        )

    def encode(self) -> bytes:
        hosts = sorted(self.received.keys() | self.errors.keys())
        table = {
            h: {"bytes": self.received.get(h, 0), "errors": self.errors.get(h, 0)} for h in hosts
        }
        return json.dumps({"format": 1, "mirrors": table}, indent=1, sort_keys=True).encode()


def _summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def read_mirror_totals(path: Path) -> MirrorTotals:
    """The totals recorded in ``path``; none when it is missing or unreadable (the counters
    then start again, which Prometheus reads as a reset)."""
    try:
        raw: Any = json.loads(path.read_bytes())
        table = raw["mirrors"] if raw.get("format") == 1 else {}
        return MirrorTotals(
            received={str(h): int(v["bytes"]) for h, v in table.items()},
            errors={str(h): int(v["errors"]) for h, v in table.items()},
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return MirrorTotals(received={}, errors={})


def add_mirror_totals(path: Path, tally: MirrorTally) -> None:
    """Add what ``tally`` counted since its last ``take`` to the totals in ``path``. Callers
    hold the node's state lock (one fetch at a time), so read-add-replace loses nothing."""
    taken = tally.take()
    if not taken.received and not taken.errors:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, read_mirror_totals(path).plus(taken).encode())


_TALLY = MirrorTally()


def mirror_tally() -> MirrorTally:
    """The process's tally (the metrics file is written by the same process)."""
    return _TALLY
