"""Byte ranges of one file: which parts are written, verified, or still to fetch.

Where it sits: under the segmented download (``reconciler.models.segmented``) and its partial
record (``reconciler.models.partial``). A ``ByteRanges`` is a set of half-open ``[start, end)``
intervals kept merged and sorted, so that a file of many segments is described by as few
pairs as there are gaps.

What it may not do: any I/O. It is plain arithmetic on offsets; callers hold their own locks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["ByteRanges"]


class ByteRanges:
    """Merged, sorted half-open intervals over ``[0, size)``."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in pairs:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every interval that touches or overlaps [start, end) merges into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_left(self._starts, end)
        keep: list[tuple[int, int]] = []
        for index in range(first, last):
            left, right = self._starts[index], self._ends[index]
            if left < start:
                keep.append((left, start))
            if right > end:
                keep.append((end, right))
        self._starts[first:last] = [s for s, _ in keep]
        self._ends[first:last] = [e for _, e in keep]

    def contiguous_end(self, offset: int) -> int:
        """The end of the interval holding ``offset``, or ``offset`` if none holds it."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and self._ends[index] > offset:
            return self._ends[index]
        return offset

    def first(self) -> tuple[int, int] | None:
        return (self._starts[0], self._ends[0]) if self._starts else None

    def complement(self, size: int) -> ByteRanges:
        """What ``[0, size)`` holds that this set does not."""
        gaps = ByteRanges()
        at = 0
        for start, end in self:
            if start > at:
                gaps.add(at, min(start, size))
            at = max(at, end)
        if at < size:
            gaps.add(at, size)
        return gaps

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def pairs(self) -> list[list[int]]:
        """JSON-ready ``[[start, end], …]``."""
        return [[s, e] for s, e in self]

    def copy(self) -> ByteRanges:
        twin = ByteRanges()
        twin._starts, twin._ends = list(self._starts), list(self._ends)
        return twin

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteRanges) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ByteRanges({list(self)!r})"
