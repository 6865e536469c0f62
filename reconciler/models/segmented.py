"""Download one large file as byte ranges over several connections and every mirror at once.

Where it sits: ``download_file`` (``reconciler.models.download``) hands a file here when it is
large enough to split and a mirror speaks HTTP; smaller files and mirrors that ignore
``Range`` keep the one-stream path. One ``SegmentedDownload`` runs one file: the calling
thread steers (adds connections while the rate per connection holds, writes the partial
record, watches the deadline and the caller's cancel), worker threads each hold one connection
slot from the fetch's ``ConnectionBudget`` and fetch segments (``SegmentPlan``) from the
mirror the ``MirrorBoard`` picks.

What it guarantees:

* Segments are written at their offsets (``pwrite``) and hashed as the contiguous prefix
  grows (``PrefixHash``); memory is bounded by the network reads in flight.
* A request with no byte for ``stall_s`` times out and its segment is asked again, from
  another mirror when there is one; sooner (``QUIET_BYTES``, at least ``QUIET_FLOOR_S``) while
  other connections receive, the steering thread cuts the silent one's connection. A slow
  mirror's tail is split off to faster connections.
* With per-chunk digests a chunk is verified as soon as its last byte arrives; a mirror that
  sends wrong bytes costs only the chunks it sent and is dropped for the file. Without them
  the file's digest decides, and the caller retries mirror by mirror (``WrongBytesError``).
* ``<partial>.parts`` records what is written and what is durable (see ``partial``): a killed
  or powered-off download resumes without asking again for the bytes recorded.

What it may not do: rename the partial, touch other files, or let an httpx exception out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reconciler.core.errors import DownloadError
from reconciler.models.limits import ConnectionBudget, DownloadLimits
from reconciler.models.mirrors import Mirror, MirrorBoard, mirror_tally
from reconciler.models.partial import PartsRecord, PrefixHash, boot_id, pwrite_all, record_path
from reconciler.models.ranges import ByteRanges
from reconciler.models.segments import Segment, SegmentPlan
from reconciler.models.wire import (
    connection_cutter,
    content_length,
    content_range,
    describe,
    status_text,
    timeout_kind,
)

__all__ = ["FileTarget", "RangesRefusedError", "SegmentedDownload", "WrongBytesError"]

STEER_EVERY_S = 0.1  # the steering thread's tick
GROW_WINDOW_S = 0.5  # seconds of rate measured before connections are added
GROW_KEEPS = 0.8  # connections are added while the rate per connection stays above this
# The record is rewritten after this much new data (what a SIGKILL can cost: 0.4 % of a
# 512 MiB half-download), or this often…
RECORD_EVERY_BYTES = 2 * 1024 * 1024
RECORD_EVERY_S = 0.5
DURABLE_EVERY_S = 2.0  # fdatasync of the partial, then a durable record
# A body silent this long while other connections receive is cut and asked again: as long as
# QUIET_BYTES take at the rate per connection, never under QUIET_FLOOR_S (a lost packet's
# retransmission on a healthy path takes well under it) nor over ``stall_s``.
QUIET_BYTES = 4 * 1024 * 1024
QUIET_FLOOR_S = 1.0
_PERMANENT = {401, 403, 404, 410, 416}  # a mirror that answers these will not get better


class RangesRefusedError(Exception):
    """No mirror left honours ``Range``: the caller downloads the whole file in one stream."""


class WrongBytesError(Exception):
    """The file's digest did not match (no per-chunk digests to say which bytes were wrong)."""

    def __init__(self, got: str, contributors: list[Mirror]) -> None:
        super().__init__(got)
        self.got = got
        self.contributors = contributors


class _RequestError(Exception):
    """One request failed; ``drop`` when the mirror must not be asked again for this file."""

    def __init__(
        self,
        reason: str,
        *,
        drop: bool = False,
        wrong: bool = False,
        stalled: bool = False,
        discard: bool = False,
    ) -> None:
        super().__init__(reason)
        self.drop = drop
        self.wrong = wrong  # the bytes failed a chunk digest
        self.stalled = stalled  # the mirror stopped sending (read timeout or watchdog cut)
        # The bytes received are not to be kept (wrong, or in a chunk that failed its digest
        # while an earlier request sent its head: which mirror erred is not known).
        self.discard = discard or wrong


class _NoRangesError(Exception):
    """The mirror answered a Range request with the whole file."""


@dataclass(frozen=True, kw_only=True)
class FileTarget:
    """The file to make: its size, digest and optional per-chunk digests (hex)."""

    size: int
    want: str  # sha256 hex of the whole file
    label: str
    chunk_bytes: int | None = None
    chunk_digests: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return "sha256:" + self.want


@dataclass
class _Steering:
    """What the steering thread measures between ticks."""

    workers: int = 0
    measured_with: int = 0
    window_started: float = 0.0
    window_bytes: int = 0
    rate_per_connection: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)


class SegmentedDownload:
    """One file, many connections (see the module docstring)."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        target: FileTarget,
        partial: Path,
        board: MirrorBoard,
        limits: DownloadLimits,
        budget: ConnectionBudget,
        report: Callable[[int], None],
        on_connections: Callable[[int], None],
        should_stop: Callable[[], bool],
        stop_at: float,
        connect_timeout_s: float,
    ) -> None:
        self._client = client
        self._target = target
        self._partial = partial
        self._board = board
        self._limits = limits
        self._budget = budget
        self._report = report
        self._on_connections = on_connections
        self._should_stop = should_stop
        self._stop_at = stop_at
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._received = 0  # bytes written this run (for the growth rule and the record)
        self._failures: list[str] = []
        self._local_error: OSError | None = None
        self._stopped: str | None = None
        self._fd = -1
        self._plan: SegmentPlan | None = None
        self._prefix: PrefixHash | None = None
        self._record: _Checkpoints | None = None

    # ------------------------------------------------------------------ steering

    def run(self) -> list[Mirror]:
        """Download, verify and fsync the file; the mirrors that served it. Raises
        ``DownloadError`` (partial and record kept), ``WrongBytesError`` (both deleted by the
        caller), ``RangesRefusedError`` or ``OSError``."""
        kept = self._open()
        try:
            assert self._plan is not None and self._prefix is not None
            self._report(kept.total())
            self._steer()
            if self._local_error is not None:
                raise self._local_error
            if self._plan.unfinished():
                assert self._record is not None
                self._record.save(durable=True)
                raise _unfinished(
                    self._target.label,
                    stopped=self._stopped,
                    board=self._board,
                    failures=self._failures,
                )
            return self._verify()
        finally:
            if self._prefix is not None:
                self._prefix.close()
            os.close(self._fd)

    def _open(self) -> ByteRanges:
        target, limits = self._target, self._limits
        self._partial.parent.mkdir(parents=True, exist_ok=True)
        kept = _resume_from(self._partial, self._target)
        self._fd = os.open(self._partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        align = target.chunk_bytes or 1
        piece = max(
            limits.min_split_bytes,
            min(limits.piece_bytes, target.size // (2 * limits.connections_per_file)),
        )
        self._plan = SegmentPlan(
            size=target.size,
            kept=kept,
            piece_bytes=-(-piece // align) * align,
            min_split=limits.min_split_bytes,
            align=align,
            connections=limits.connections_per_file,
        )
        self._prefix = PrefixHash(
            self._fd, size=target.size, read_bytes=limits.read_buffer_bytes(), kept=kept
        )
        self._record = _Checkpoints(
            partial=self._partial, fd=self._fd, target=target, prefix=self._prefix
        )
        return kept

    def _steer(self) -> None:
        assert self._plan is not None
        state = _Steering(window_started=time.monotonic())
        if not self._start_worker(state, wait=True):
            return
        for _ in range(self._limits.initial_connections - 1):
            self._start_worker(state, wait=False)
        while any(t.is_alive() for t in state.threads):
            time.sleep(STEER_EVERY_S)
            now = time.monotonic()
            if self._stopped is None:
                self._check_stop(now)
            if self._stopped is None:
                self._grow(state, now)
                self._plan.cut_silent(now, quiet_s=_quiet_s(self._board, self._limits))
            self._checkpoint(now)
        for thread in state.threads:
            thread.join()
        self._checkpoint(time.monotonic(), force=True)

    def _check_stop(self, now: float) -> None:
        assert self._plan is not None
        reason = _stop_reason(
            cancelled=self._should_stop(), late=now >= self._stop_at, local=self._local_error
        )
        if reason is not None:
            self._stopped = reason
            self._plan.cancel_all(reason)

    def _grow(self, state: _Steering, now: float) -> None:
        """Add connections while each added one still brings its share (see GROW_KEEPS)."""
        assert self._plan is not None
        with self._lock:
            received = self._received
        span = now - state.window_started
        if span < GROW_WINDOW_S:
            return
        alive = sum(t.is_alive() for t in state.threads)
        rate = (received - state.window_bytes) / span
        state.window_started, state.window_bytes = now, received
        if alive != state.measured_with:
            state.measured_with = alive  # measure a whole window at this count first
            return
        per_connection = rate / max(1, alive)
        before = state.rate_per_connection
        if before is not None and per_connection < GROW_KEEPS * before:
            return
        state.rate_per_connection = per_connection
        room = self._limits.connections_per_file - alive
        for _ in range(min(room, max(1, alive))):
            if not self._plan.has_work() or not self._start_worker(state, wait=False):
                break

    def _start_worker(self, state: _Steering, *, wait: bool) -> bool:
        while not self._budget.take(wait=wait):
            if not wait or self._should_stop() or time.monotonic() >= self._stop_at:
                if wait:
                    self._stopped = "cancelled" if self._should_stop() else "deadline passed"
                return False
        thread = threading.Thread(target=self._work, name="segment", daemon=True)
        state.threads.append(thread)
        self._on_connections(1)
        thread.start()
        return True

    def _checkpoint(self, now: float, *, force: bool = False) -> None:
        assert self._record is not None
        with self._lock:
            received = self._received
        try:
            self._record.tick(received, now, force=force)
        except OSError as exc:
            self._local_error = self._local_error or exc

    def _verify(self) -> list[Mirror]:
        assert self._prefix is not None
        while not self._prefix.wait_complete(0.5):
            if self._should_stop():
                raise DownloadError(f"cannot download {self._target.label}: cancelled")
        got = self._prefix.hexdigest()
        contributors = [m for m in self._board.mirrors if m.bytes > 0]
        if got != self._target.want:
            raise WrongBytesError(got, contributors)
        os.fsync(self._fd)
        record_path(self._partial).unlink(missing_ok=True)
        return contributors

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        """One connection: segments until none is left worth taking."""
        assert self._plan is not None
        avoid: Mirror | None = None
        try:
            while self._local_error is None and self._stopped is None:
                mirror = self._board.choose(need_ranges=True, avoid=avoid)
                if mirror is None:
                    return
                segment = self._plan.claim(time.monotonic(), slow=self._slow)
                if segment is None:
                    self._board.done(mirror, got=0, seconds=0.0)
                    return
                avoid = self._one_request(segment, mirror)
        except OSError as exc:
            self._local_error = self._local_error or exc
        finally:
            self._budget.give_back()
            self._on_connections(-1)

    def _slow(self, segment: Segment) -> bool:
        return _is_slow(segment, self._board, quiet_s=self._limits.stall_s / 3)

    def _one_request(self, segment: Segment, mirror: Mirror) -> Mirror | None:
        """Fetch one segment from one mirror; the mirror to avoid next time, if it failed."""
        assert self._plan is not None
        segment.mirror = mirror
        started = time.monotonic()
        before = segment.pos
        try:
            self._request(segment, mirror)
        except _NoRangesError:
            self._board.no_ranges(mirror)
            self._board.done(mirror, got=0, seconds=0.0)
            self._report(-self._plan.release(segment))
            return None
        except _RequestError as exc:
            got = segment.pos - before
            self._board.failed(
                mirror,
                str(exc),
                got=got,
                seconds=time.monotonic() - started,
                drop=exc.drop,
                wrong=exc.wrong,
                stalled=exc.stalled,
            )
            with self._lock:
                self._failures.append(f"{mirror.shown}: {exc}")
            self._report(-self._plan.release(segment, keep=not exc.discard))
            return mirror
        self._board.done(mirror, got=segment.pos - before, seconds=time.monotonic() - started)
        if segment.pos < segment.end and segment.cancelled is None:
            with self._lock:
                self._failures.append(f"{mirror.shown}: body ended at byte {segment.pos}")
        self._report(-self._plan.release(segment))
        return None

    def _request(self, segment: Segment, mirror: Mirror) -> None:
        assert self._plan is not None
        asked = (segment.pos, segment.end)  # the segment's end may shrink while this runs
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={asked[0]}-{asked[1] - 1}"}
        try:
            with self._client.stream(
                "GET",
                mirror.url,
                headers=headers,
                timeout=_timeout(self._stop_at, self._limits.stall_s, self._connect_timeout_s),
            ) as response:
                _accept(response, asked, size=self._target.size)
                self._board.ranges_work(mirror)
                checker = _ChunkChecker(self._target, segment.verified)
                checker.preload(self._fd, segment.pos, self._limits.read_buffer_bytes())
                self._plan.receiving(segment, connection_cutter(response), time.monotonic())
                try:
                    for data in response.iter_raw():
                        if not self._take(segment, mirror, data, checker):
                            break
                finally:
                    # Before the connection goes back to the pool: nobody may cut it then.
                    self._plan.receiving(segment, None, 0.0)
        except httpx.TimeoutException as exc:
            # A stall counts against the mirror even after bytes came: it stopped making any.
            raise _RequestError(f"timed out ({timeout_kind(exc)})", stalled=True) from exc
        except httpx.TooManyRedirects as exc:
            raise _RequestError("too many redirects", drop=True) from exc
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            if segment.silenced:
                raise _silent(segment) from exc
            raise _RequestError(describe(exc)) from exc
        if segment.silenced:
            raise _silent(segment)

    def _take(self, segment: Segment, mirror: Mirror, data: bytes, checker: _ChunkChecker) -> bool:
        """Write one network read at its offset; False once the segment needs no more."""
        assert self._plan is not None and self._prefix is not None and self._record is not None
        offset, take = self._plan.advance(segment, len(data), time.monotonic())
        if take:
            view = memoryview(data)[:take]
            pwrite_all(self._fd, view, offset)
            mirror_tally().received(mirror.url, take)
            with self._lock:
                self._received += take
                received = self._received
            self._report(take)
            if checker.active:
                for start, end in checker.feed(view):
                    self._plan.verified(segment, end)
                    self._prefix.wrote(start, None, end - start)
            else:
                self._plan.verified(segment, offset + take)
                self._prefix.wrote(offset, view, take)
            self._record.nudge(received)
        return not self._plan.is_done(segment)


class _Checkpoints:
    """When the partial's record is rewritten, and when it is made durable: the record is
    cheap and bounds what a killed process re-sends (every RECORD_EVERY_BYTES of new data,
    saved by the connection that crosses the mark, or RECORD_EVERY_S); an fdatasync is not,
    and bounds what a power loss re-sends (DURABLE_EVERY_S, from the steering thread)."""

    def __init__(self, *, partial: Path, fd: int, target: FileTarget, prefix: PrefixHash) -> None:
        self._path = record_path(partial)
        self._fd = fd
        self._target = target
        self._prefix = prefix
        self._boot = boot_id()
        old = PartsRecord.load(self._path)
        self._durable = old.durable if old is not None else ()
        self._recorded_at = self._synced_at = time.monotonic()
        self._recorded_bytes = 0
        self._lock = threading.Lock()

    def nudge(self, received: int) -> None:
        """From a connection: save if RECORD_EVERY_BYTES arrived since the last save, unless
        a save is running (the data goes into the next one; nobody waits on a sync)."""
        if received - self._recorded_bytes < RECORD_EVERY_BYTES:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._save(durable=False, received=received, now=time.monotonic())
        finally:
            self._lock.release()

    def tick(self, received: int, now: float, *, force: bool = False) -> None:
        """From the steering thread: save the record if it is due; ``received`` counts the
        bytes written this run."""
        with self._lock:
            durable = force or now - self._synced_at >= DURABLE_EVERY_S
            due = received - self._recorded_bytes >= RECORD_EVERY_BYTES
            if not (durable or due or now - self._recorded_at >= RECORD_EVERY_S):
                return
            if received == self._recorded_bytes and not force:
                self._recorded_at = now
                return
            self._save(durable=durable, received=received, now=now)

    def save(self, *, durable: bool) -> None:
        with self._lock:
            self._save(durable=durable, received=self._recorded_bytes, now=time.monotonic())

    def _save(self, *, durable: bool, received: int, now: float) -> None:
        """Record what the partial holds; ``durable`` syncs its data first (power-loss safe)."""
        written = tuple(self._prefix.done_ranges())  # before the sync: all of it is synced
        if durable:
            os.fdatasync(self._fd)
            self._durable = written
        target = self._target
        PartsRecord(
            size=target.size,
            digest=target.digest,
            chunk_bytes=target.chunk_bytes,
            boot=self._boot,
            written=written,
            durable=self._durable,
        ).save(self._path, durable=durable)
        self._recorded_at, self._recorded_bytes = now, received
        if durable:
            self._synced_at = now


def _stop_reason(*, cancelled: bool, late: bool, local: OSError | None) -> str | None:
    """Why every request of the file must stop now, or None."""
    if cancelled:
        return "cancelled"
    if late:
        return "deadline of the download passed"
    return "local error" if local is not None else None


def _quiet_s(board: MirrorBoard, limits: DownloadLimits) -> float:
    """How long a body may be silent while others move (see QUIET_BYTES)."""
    best = max((m.rate() for m in board.live()), default=0.0)
    quiet = QUIET_BYTES / best if best > 0 else limits.stall_s
    return min(limits.stall_s, max(QUIET_FLOOR_S, quiet))


def _silent(segment: Segment) -> _RequestError:
    """The watchdog cut the request: a stall, as the read timeout would have found later."""
    return _RequestError(segment.cancelled or "stalled", stalled=True)


def _is_slow(segment: Segment, board: MirrorBoard, *, quiet_s: float) -> bool:
    """A segment worth splitting small: silent for a while, or on a mirror far slower than
    the best one."""
    mirror = segment.mirror
    if mirror is None:
        return False
    best = max((m.rate() for m in board.live()), default=0.0)
    quiet = time.monotonic() - segment.last_byte_at > quiet_s
    return quiet or mirror.rate() < 0.25 * best


def _unfinished(
    label: str, *, stopped: str | None, board: MirrorBoard, failures: list[str]
) -> Exception:
    """Why the file is not complete, as the error the caller raises or acts on."""
    if stopped == "cancelled":
        return DownloadError(f"cannot download {label}: cancelled")
    if stopped is None and not board.any_ranges() and board.live():
        return RangesRefusedError()
    last = failures[-1] if failures else (stopped or "no mirror to try")
    more = len(failures) - 1
    tail = f" (and {more} earlier failure(s))" if more > 0 else ""
    return DownloadError(f"cannot download {label}: {last}{tail}")


def _timeout(stop_at: float, stall_s: float, connect_timeout_s: float) -> httpx.Timeout:
    """A stall is a read that waits ``stall_s``; nothing waits past the file's deadline."""
    left = max(0.001, stop_at - time.monotonic())
    read = min(stall_s, left)
    connect = min(connect_timeout_s, left)
    return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)


def _resume_from(partial: Path, target: FileTarget) -> ByteRanges:
    """The bytes a previous run left that may be kept; the record is (re)written first,
    so that a partial file never exists without one saying what in it is valid."""
    path = record_path(partial)
    record = PartsRecord.load(path)
    kept: ByteRanges | None = None
    if record is not None:
        kept = record.trusted(
            size=target.size, digest=target.digest, chunk_bytes=target.chunk_bytes
        )
    if kept is None:
        kept = ByteRanges()
        with contextlib.suppress(FileNotFoundError):
            have = partial.stat().st_size
            # No record: a one-stream download's prefix (the same bytes, front to back).
            if record is None and target.chunk_bytes is None and have <= target.size:
                kept.add(0, have)
            elif have:
                os.truncate(partial, 0)
    pairs = tuple(kept)
    PartsRecord(
        size=target.size,
        digest=target.digest,
        chunk_bytes=target.chunk_bytes,
        boot=boot_id(),
        written=pairs,
        durable=record.durable if record is not None and pairs else (),
    ).save(path, durable=True)
    return kept


def _accept(response: httpx.Response, asked: tuple[int, int], *, size: int) -> None:
    """Refuse an answer that cannot be the asked bytes of this file."""
    status = response.status_code
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _RequestError(f"mirror sent Content-Encoding {encoding!r}", drop=True)
    if status == 200:
        raise _NoRangesError
    if status != 206:
        raise _RequestError(status_text(response), drop=status in _PERMANENT)
    found = content_range(response)
    if found is None:
        raise _RequestError("206 without a usable Content-Range", drop=True)
    first, last, total = found
    length = content_length(response)
    if total is not None and total != size:
        declared = size
        raise _RequestError(f"mirror's file has {total} bytes, {declared} declared", drop=True)
    if first != asked[0] or last >= asked[1] or (length is not None and length != last - first + 1):
        raise _RequestError(f"206 for bytes {first}-{last}, asked from {asked[0]}", drop=True)


class _ChunkChecker:
    """Per-chunk digests of the bytes one request receives, front to back from a chunk
    boundary. ``feed`` returns the chunks completed and verified; a wrong one raises."""

    def __init__(self, target: FileTarget, start: int) -> None:
        self.active = target.chunk_bytes is not None
        self._target = target
        self._size = target.chunk_bytes or 1
        self._start = start
        self._hash = hashlib.sha256()
        self._have = 0
        self._mixed = False  # the current chunk's head was read back (an earlier request's)

    def preload(self, fd: int, upto: int, read_bytes: int) -> None:
        """Hash the bytes ``[start, upto)`` an earlier, cut request left on disk: the head of
        the chunk this request completes."""
        at = self._start
        while self.active and at < upto:
            data = os.pread(fd, min(read_bytes, upto - at), at)
            if not data:
                raise OSError(f"partial file shorter than its kept bytes (at byte {at})")
            self._hash.update(data)
            at += len(data)
            self._have += len(data)
            self._mixed = True

    def feed(self, view: memoryview) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        while view:
            index = self._start // self._size
            end = min(self._target.size, self._start + self._size)
            step = min(len(view), end - self._start - self._have)
            self._hash.update(view[:step])
            self._have += step
            view = view[step:]
            if self._start + self._have < end:
                break
            if self._hash.hexdigest() != self._target.chunk_digests[index]:
                if self._mixed:
                    raise _RequestError(f"chunk {index} failed its digest", discard=True)
                raise _RequestError(f"chunk {index} failed its digest", wrong=True)
            done.append((self._start, end))
            self._start, self._have, self._hash = end, 0, hashlib.sha256()
            self._mixed = False
        return done
