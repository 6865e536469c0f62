"""Which bytes of a file each connection fetches next: pieces in file order, smaller as the
file nears its end, then halves of the largest segment still running, so that no connection
idles while another has far to go.

Where it sits: the segmented download (``reconciler.models.segmented``) asks its
``SegmentPlan`` for a segment whenever a connection is free, reports each network read
(``advance``), and gives a segment back when its request ended early (``release``: the bytes not
yet verified return to the plan). Pieces are handed out front to back, so the contiguous
prefix the hash follows grows while the file arrives. A segment served slowly is split at a
smaller size than a healthy one: the tail of a file never waits on one slow mirror.

What it may not do: any I/O or any choice of mirror. Thread-safe: every method takes the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from reconciler.models.mirrors import Mirror
from reconciler.models.ranges import ByteRanges

__all__ = ["Segment", "SegmentPlan"]

SLOW_SPLIT_BYTES = 256 * 1024  # the smallest tail taken from a segment on a slow mirror


@dataclass(eq=False)
class Segment:
    """One request's bytes: ``[start, end)``, of which ``[start, pos)`` have arrived and
    ``[verified, pos)`` wait for their chunk's digest (plain files: ``verified == pos``).
    ``verified`` may start before ``start``: the chunk's head came with an earlier request."""

    start: int
    pos: int
    end: int
    verified: int
    last_byte_at: float
    mirror: Mirror | None = None
    cancelled: str | None = None  # why the engine wants this request to stop
    # Ends the request's connection at once (set while its body arrives): a read blocked on
    # a silent mirror returns, instead of waiting for its timeout.
    abort: Callable[[], None] | None = None
    silenced: bool = False  # cut by the watchdog: the mirror stopped sending


class SegmentPlan:
    """The bytes of one file still to fetch, and the segments being fetched."""

    def __init__(
        self,
        *,
        size: int,
        kept: ByteRanges,
        piece_bytes: int,
        min_split: int,
        align: int,
        connections: int = 1,
    ) -> None:
        self.size = size
        self.todo = kept.complement(size)
        self.active: list[Segment] = []
        self._piece = piece_bytes
        self._min_split = min_split
        self._connections = max(1, connections)
        # Gaps whose first bytes follow ones on disk that wait for their chunk's digest: the
        # gap's start → where that chunk starts (a cut request's tail, kept, not asked again).
        self._pending: dict[int, int] = {}
        self._align = max(1, align)
        self.last_read_at = 0.0  # when any segment last received a byte
        self.lock = threading.Lock()

    def claim(self, now: float, *, slow: Callable[[Segment], bool]) -> Segment | None:
        """The next segment for a free connection, or None when nothing is worth taking."""
        with self.lock:
            first = self.todo.first()
            if first is not None:
                start, gap_end = first
                end = min(gap_end, self._aligned(start + self._piece_now()))
                self.todo.remove(start, end)
                segment = Segment(start, start, end, self._pending.pop(start, start), now)
                self.active.append(segment)
                return segment
            return self._split(now, slow=slow)

    def _piece_now(self) -> int:
        """Pieces shrink as the bytes left to hand out do (down to ``min_split``), so that
        the last requests of a file end close together without splitting a running one: a
        split costs what the cut connection already holds in flight (socket buffers, sent
        by the mirror and thrown away), a smaller piece only a request."""
        share = self.todo.total() // (2 * self._connections)
        return max(self._min_split, min(self._piece, share))

    def _split(self, now: float, *, slow: Callable[[Segment], bool]) -> Segment | None:
        best: Segment | None = None
        best_left = 0
        for segment in self.active:
            if segment.cancelled is not None:
                continue
            left = segment.end - segment.pos
            least = SLOW_SPLIT_BYTES if slow(segment) else 2 * self._min_split
            if left >= least and left > best_left:
                best, best_left = segment, left
        if best is None:
            return None
        middle = self._aligned(best.pos + best_left // 2)
        if middle >= best.end:
            return None
        twin = Segment(middle, middle, best.end, middle, now)
        best.end = middle
        self.active.append(twin)
        return twin

    def _aligned(self, offset: int) -> int:
        """``offset`` rounded up to a chunk boundary (never past the file's end)."""
        align = self._align
        return min(self.size, -(-offset // align) * align)

    def advance(self, segment: Segment, count: int, now: float) -> tuple[int, int]:
        """Reserve the next ``count`` received bytes: (offset, how many fit in the segment)."""
        with self.lock:
            if segment.cancelled is not None:
                return segment.pos, 0
            take = max(0, min(count, segment.end - segment.pos))
            offset = segment.pos
            segment.pos += take
            segment.last_byte_at = self.last_read_at = now
            return offset, take

    def verified(self, segment: Segment, upto: int) -> None:
        with self.lock:
            segment.verified = max(segment.verified, upto)

    def is_done(self, segment: Segment) -> bool:
        with self.lock:
            return segment.pos >= segment.end or segment.cancelled is not None

    def release(self, segment: Segment, *, keep: bool = True) -> int:
        """End a segment: the bytes it did not receive go back to the plan. Those received but
        not yet verified (the head of a chunk) stay on disk when ``keep``, for the request that
        takes the rest of the chunk; without ``keep`` (they failed a digest) they go back too.
        Returns how many bytes that threw away."""
        with self.lock:
            if segment in self.active:
                self.active.remove(segment)
            if keep and segment.verified < segment.pos < segment.end:
                self.todo.add(segment.pos, segment.end)
                self._pending[segment.pos] = segment.verified
                return 0
            wasted = segment.pos - segment.verified
            if segment.verified < segment.end:
                self.todo.add(segment.verified, segment.end)
            return wasted

    def receiving(self, segment: Segment, abort: Callable[[], None] | None, now: float) -> None:
        """The segment's answer arrived (``abort`` ends its connection) or its request is
        over (``None``: the connection may go back to the pool and must not be cut)."""
        with self.lock:
            segment.abort = abort
            if abort is not None:
                segment.last_byte_at = now

    def cut_silent(self, now: float, *, quiet_s: float) -> int:
        """Abort the requests silent for ``quiet_s`` while another segment received bytes
        within ``quiet_s``: the link works, those mirrors stopped. Returns how many."""
        with self.lock:
            if now - self.last_read_at >= quiet_s:
                return 0  # nothing moves at all: the read timeout decides
            silent = [
                s
                for s in self.active
                if s.abort is not None and s.cancelled is None and now - s.last_byte_at > quiet_s
            ]
            for segment in silent:
                segment.cancelled = f"no data for {quiet_s:.1f} s while other connections got data"
                segment.silenced = True
                abort, segment.abort = segment.abort, None
                assert abort is not None
                abort()  # under the lock: the request cannot end and hand its connection on
            return len(silent)

    def cancel_all(self, reason: str) -> None:
        with self.lock:
            for segment in self.active:
                segment.cancelled = segment.cancelled or reason

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.todo) or any(s.pos < s.end for s in self.active)

    def unfinished(self) -> bool:
        with self.lock:
            return bool(self.todo) or bool(self.active)
