"""Progress of model downloads, for people: a redrawn bar on a terminal, log lines elsewhere.

Where it sits: the model store creates one reporter per fetch and hands each download a
callback that adds byte deltas; downloads run on several threads, so every method here is
thread-safe. On a TTY one status line on stderr is redrawn in place with ``\\r`` (total and
the files in flight: bytes, percentage, rate); otherwise a log line is written every
``log_interval_s`` seconds or every ``log_step`` of the total, whichever comes first, plus
one line per finished file.

What it may not do: decide anything. It only formats numbers it is given; it never reads
files or the network, and a broken stream never fails a download.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["ProgressReporter", "format_bytes", "format_rate"]

_log = logging.getLogger("reconciler.progress")

RATE_WINDOW_S = 5.0  # seconds of samples behind a rate: smooth, yet follows a stalled mirror


def format_bytes(count: float) -> str:
    """1536 → ``1.5 KiB``; binary units, as disk sizes are shown by df -h."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(per_second: float) -> str:
    return format_bytes(per_second) + "/s"


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Meter:
    """Bytes done of a size, with recent samples for the rate."""

    size: int
    started: float
    done: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, delta: int, now: float) -> None:
        self.done = max(0, self.done + delta)
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        if not self.samples:
            return 0.0
        since, then = self.samples[0]
        if now - since < 0.2:
            since, then = self.started, 0
        span = now - since
        return max(0.0, (self.done - then) / span) if span > 0 else 0.0

    def fraction(self) -> float:
        return min(1.0, self.done / self.size) if self.size else 1.0


class ProgressReporter:
    """Reports the progress of one fetch: ``start``, then per file ``file_started`` (which
    returns the byte-delta callback for ``download_file``) and ``file_finished``, then
    ``finish``."""

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        logger: logging.Logger | None = None,
        log_interval_s: float = 5.0,
        log_step: float = 0.10,
        redraw_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self._stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self._logger = logger or _log
        self._log_interval_s = log_interval_s
        self._log_step = log_step
        self._redraw_interval_s = redraw_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._total = _Meter(size=0, started=clock())
        self._files: dict[str, _Meter] = {}
        self._files_total = 0
        self._files_done = 0
        self._files_failed = 0
        self._connections = 0  # open to mirrors right now, over every file
        self.peak_connections = 0
        self._last_output = float("-inf")
        self._last_step = 0
        self._drawn = False

    def start(self, *, total_bytes: int, total_files: int) -> None:
        with self._lock:
            now = self._clock()
            self._total = _Meter(size=total_bytes, started=now)
            self._files_total = total_files
            if not self.interactive:
                self._logger.info(
                    "fetching %d model file(s), %s", total_files, format_bytes(total_bytes)
                )
                self._last_output = now

    def file_started(self, name: str, size: int) -> Callable[[int], None]:
        with self._lock:
            self._files[name] = _Meter(size=size, started=self._clock())

        def advance(delta: int) -> None:
            self._advance(name, delta)

        return advance

    def connections_changed(self, delta: int) -> None:
        """A download opened (+1) or closed (-1) a connection to a mirror."""
        with self._lock:
            self._connections = max(0, self._connections + delta)
            self.peak_connections = max(self.peak_connections, self._connections)

    def file_finished(self, name: str, *, ok: bool, reason: str | None = None) -> None:
        with self._lock:
            now = self._clock()
            meter = self._files.pop(name, None)
            if ok:
                self._files_done += 1
            else:
                self._files_failed += 1
            if self.interactive:
                if not ok:
                    self._print_above(f"failed {name}: {reason or 'error'}")
                # A thousand small files finish within a second: redraw at the bar's pace.
                self._draw(now, force=not ok)
                return
            took = now - meter.started if meter else 0.0
            size = format_bytes(meter.size) if meter else "?"
            if ok:
                self._logger.info("fetched %s (%s) in %s", name, size, _format_duration(took))
            else:
                self._logger.warning("failed to fetch %s: %s", name, reason or "error")

    def finish(self) -> None:
        with self._lock:
            now = self._clock()
            if self.interactive:
                self._draw(now, force=True)
                if self._drawn:
                    self._write("\n")
                    self._drawn = False
                return
            took = now - self._total.started
            self._logger.info(
                "fetched %d of %d model file(s), %s in %s",
                self._files_done,
                self._files_total,
                format_bytes(self._total.done),
                _format_duration(took),
            )

    def _advance(self, name: str, delta: int) -> None:
        with self._lock:
            now = self._clock()
            meter = self._files.get(name)
            if meter is not None:
                meter.add(delta, now)
            self._total.add(delta, now)
            if self.interactive:
                self._draw(now, force=False)
            else:
                self._maybe_log(now)

    def _maybe_log(self, now: float) -> None:
        step = int(self._total.fraction() / self._log_step) if self._log_step > 0 else 0
        due = now - self._last_output >= self._log_interval_s
        if not due and step <= self._last_step:
            return
        self._last_step = max(self._last_step, step)
        self._last_output = now
        total = self._total
        self._logger.info(
            "models: %s of %s (%d%%) at %s, ETA %s, %d connection(s), %d of %d file(s) done",
            format_bytes(total.done),
            format_bytes(total.size),
            int(total.fraction() * 100),
            format_rate(total.rate(now)),
            self._eta(now) or "unknown",
            self._connections,
            self._files_done,
            self._files_total,
        )

    def _eta(self, now: float) -> str | None:
        total = self._total
        rate = total.rate(now)
        left = total.size - total.done
        return _format_duration(left / rate) if rate > 0 and left > 0 else None

    def _status_line(self, now: float) -> str:
        total = self._total
        eta = self._eta(now)
        head = (
            f"models {self._files_done}/{self._files_total} "
            f"{format_bytes(total.done)}/{format_bytes(total.size)} "
            f"{int(total.fraction() * 100):3d}% {format_rate(total.rate(now))}"
            f"{f' ETA {eta}' if eta else ''} {self._connections} conn"
        )
        files = [
            f"{name} {int(m.fraction() * 100)}% {format_rate(m.rate(now))}"
            for name, m in self._files.items()
        ]
        return " | ".join([head, *files])

    def _draw(self, now: float, *, force: bool) -> None:
        if not force and now - self._last_output < self._redraw_interval_s:
            return
        self._last_output = now
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        line = self._status_line(now)
        if len(line) > width:
            line = line[: width - 1] + "…"
        # Pad so a shorter line fully covers the previous one.
        self._write("\r" + line.ljust(width))
        self._drawn = True

    def _print_above(self, text: str) -> None:
        prefix = "\r" + " " * (shutil.get_terminal_size((100, 24)).columns - 1) + "\r"
        self._write((prefix if self._drawn else "") + text + "\n")
        self._drawn = False

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must not fail a download; the bar is a courtesy.
            pass
