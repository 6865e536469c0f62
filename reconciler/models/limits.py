"""How hard the node may pull on its mirrors: connection caps, segment sizes, stall timeout,
extra local mirrors; and the one budget of connections every download of a fetch shares.

Where it sits: the apply step builds one ``DownloadLimits`` from the node settings
(``DownloadLimits.of(settings)``) and hands it to ``ModelStore.ensure``; the fetcher makes one
``ConnectionBudget`` per fetch from it, and every download of that fetch takes its connections
from the budget, so that several files at once never open more than ``connections`` in all.

What it may not do: open anything. It only holds numbers and counts slots.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reconciler.models.swarm import SwarmOptions

if TYPE_CHECKING:
    from reconciler.config.settings import Settings

__all__ = ["ConnectionBudget", "DownloadLimits"]

MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class DownloadLimits:
    """The knobs of the download engine; the defaults suit a node on a CDN-capped link."""

    connections: int = 16  # open at once, over every file of a fetch
    connections_per_file: int = 8  # the most one file may use
    initial_connections: int = 4  # a file starts with these, then grows while rates hold
    # A file is split only where each part stays this large (aria2's --min-split-size): a
    # request costs a round trip, and small files are faster as one stream.
    min_split_bytes: int = 8 * MIB
    piece_bytes: int = 32 * MIB  # the most one request asks for before a new one is made
    stall_s: float = 5.0  # seconds without a byte before a segment is re-requested
    mirror_errors: int = 3  # errors in a row after which a mirror is dropped for the file
    local_mirrors: tuple[str, ...] = ()  # base URLs serving blobs/sha256/<hex>, tried first
    # Bytes held in memory per file beyond the network reads; segments that arrive out of
    # order are written to disk and read back to be hashed, never kept.
    memory_bytes: int = 64 * MIB
    # Files that carry BitTorrent pieces are fetched from the swarm first (models/swarm.py);
    # None: the node's p2p setting is off.
    swarm: SwarmOptions | None = None

    def __post_init__(self) -> None:
        if self.connections < 1 or self.connections_per_file < 1:
            raise ValueError("download connections must be at least 1")
        if self.min_split_bytes < 64 * 1024 or self.piece_bytes < self.min_split_bytes:
            raise ValueError("piece_bytes must be at least min_split_bytes (>= 64 KiB)")

    @classmethod
    def of(cls, settings: Settings) -> DownloadLimits:
        return cls(
            connections=settings.download_connections,
            connections_per_file=min(
                settings.download_connections_per_file, settings.download_connections
            ),
            initial_connections=min(4, settings.download_connections_per_file),
            local_mirrors=settings.local_mirrors,
            memory_bytes=settings.download_memory_bytes,
            swarm=SwarmOptions.of(settings),
        )

    def read_buffer_bytes(self) -> int:
        """Bytes read back from disk per hashing call: a slice of the memory budget."""
        return max(64 * 1024, min(4 * MIB, self.memory_bytes // 16))


class ConnectionBudget:
    """A counting budget of open connections shared by the downloads of one fetch."""

    def __init__(self, slots: int) -> None:
        self._free = max(1, slots)
        self._cond = threading.Condition()

    def take(self, *, wait: bool, timeout_s: float = 0.5) -> bool:
        """One slot; with ``wait``, block up to ``timeout_s`` (callers poll for cancel)."""
        with self._cond:
            if not wait:
                if self._free <= 0:
                    return False
            elif not self._cond.wait_for(lambda: self._free > 0, timeout=timeout_s):
                return False
            self._free -= 1
            return True

    def give_back(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    @property
    def free(self) -> int:
        with self._cond:
            return self._free
