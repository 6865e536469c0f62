"""Fetch one model file from the swarm: peers, and the file's mirrors as web seeds (BEP 19).

Where it sits: the fetcher calls ``fetch_through_swarm`` for a missing blob before its HTTP
download, when the node's ``p2p`` setting is on and the file carries ``bt``. It returns True
once the blob is adopted into ``blobs/``; False means "use HTTP" (libtorrent missing, the
port taken, no verified byte for ``p2p_stall_s``, or bytes whose sha256 is not the digest),
with the reason logged once and kept for ``status``.

Two checks stand between a peer and the store: libtorrent accepts a piece only when its SHA-1
is the one the signed snapshot lists (a peer that sends a wrong piece is banned), and the
finished file is hashed again here and adopted only if its sha256 is the snapshot's digest.
Downloads land in ``work/models/swarm/<hex>``, never in ``blobs/``; a download interrupted by
a crash is resumed from that file (libtorrent re-checks the pieces it holds).

What it may not do: write outside ``work/models/swarm`` except by ``BlobFolder.adopt``; keep
waiting on a swarm that makes no progress; let a libtorrent exception out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.core.documents import ModelFile
from reconciler.core.errors import DownloadError
from reconciler.models.blobs import HASH_CHUNK, BlobFolder
from reconciler.models.download import resolve_url
from reconciler.models.layout import StoreLayout, blob_hex
from reconciler.models.swarm import (
    STATUS_NAME,
    Swarm,
    SwarmOptions,
    SwarmUnavailableError,
    note_fallback,
    shared_swarm,
)

__all__ = ["SwarmJob", "fetch_through_swarm", "staging_dir", "web_seeds"]

_log = logging.getLogger("reconciler.swarm")

_POLL_S = 0.2
_QUIET_S = 2.0  # seconds without a verified byte before the web seeds come back
_HOLD_S = 10.0  # seconds web seeds stay once peers that hold pieces sent none
_MIN_ON_S = 1.0  # seconds web seeds stay on at least once a starving node turned them on
_JITTER_S = 1.0  # the most a starving node waits before it turns to its web seeds
_ENOUGH = 4  # pieces the peers must hold for this node before its web seeds go off
_STEER_S = 0.5  # seconds between two looks at what the peers hold
_RECONNECT_S = 2.0  # seconds between two calls on the peers named in the settings


@dataclass(frozen=True, kw_only=True)
class SwarmJob:
    """One file to fetch from the swarm, and how to report and stop it."""

    file: ModelFile
    label: str
    base_url: str | None
    local_mirrors: tuple[str, ...]
    progress: Callable[[int], None] | None
    should_stop: Callable[[], bool] | None


def staging_dir(layout: StoreLayout) -> Path:
    return layout.partial_dir.parent / "swarm"


def web_seeds(file: ModelFile, *, base_url: str | None, local_mirrors: Sequence[str]) -> list[str]:
    """The file's HTTP mirrors (local ones first, as the HTTP engine orders them) as web seed
    URLs; ``file://`` mirrors are not web seeds."""
    hex_ = blob_hex(file.digest)
    urls = [m.rstrip("/") + f"/blobs/sha256/{hex_}" for m in local_mirrors]
    for url in file.urls:
        with contextlib.suppress(ValueError):
            urls.append(resolve_url(url, base_url))
    seeds: list[str] = []
    for url in urls:
        if url.startswith(("http://", "https://")) and url not in seeds:
            seeds.append(url)
    return seeds


def fetch_through_swarm(
    job: SwarmJob, *, options: SwarmOptions, layout: StoreLayout, blobs: BlobFolder
) -> bool:
    """See the module docstring: True when the blob was adopted, False to use HTTP."""
    file = job.file
    if file.bt is None or file.size <= 0:
        return False
    status_path = layout.root / STATUS_NAME
    swarm = shared_swarm(options, status_path=status_path)
    if swarm is None:
        return False
    staging = staging_dir(layout)
    staging.mkdir(parents=True, exist_ok=True)
    target = staging / blob_hex(file.digest)
    try:
        try:
            _download(swarm, job, staging)
        except RuntimeError as exc:  # libtorrent's own errors (a refused torrent, a closed session)
            raise SwarmUnavailableError(f"{job.label}: libtorrent: {exc}") from None
        _check_digest(target, file.digest)
    except SwarmUnavailableError as exc:
        note_fallback(status_path, exc)
        _discard(target)
        return False
    blobs.adopt(target, blob_hex(file.digest), synced=True)
    with contextlib.suppress(RuntimeError):  # offering it is a bonus, never the fetch's failure
        swarm.seed_one(file, blobs.dir)
    swarm.write_status()
    return True


def _download(swarm: Swarm, job: SwarmJob, staging: Path) -> None:
    file = job.file
    lt = swarm.lt
    params = lt.add_torrent_params()
    params.ti = swarm.torrent_info(file)
    params.save_path = str(staging)
    seeds = _WebSeeds(
        lt,
        web_seeds(file, base_url=job.base_url, local_mirrors=job.local_mirrors),
        peers_first=swarm.can_find_peers(file),
    )
    params.url_seeds = seeds.initial
    params.trackers = list(file.bt.trackers) if file.bt else []
    params.flags = swarm.discovery_flags(file)  # not auto-managed: never queued behind others
    handle = swarm.add(params)
    try:
        swarm.connect_peers(handle)
        _wait(swarm, handle, job, seeds)
    finally:
        swarm.remove(handle)


class _WebSeeds:
    """The mirrors as web seeds only while the peers have nothing to give.

    A web seed is one more source to libtorrent, which would pull from it at full speed
    whatever the peers hold: every node of a swarm would then take most of the file from the
    origin. So, where the node can find peers at all (named peers, trackers, LSD, DHT):

    * the web seeds are off while connected peers hold at least ``_ENOUGH`` pieces this node
      lacks (or all it lacks): it takes those from them;
    * they come on when no peer holds anything it lacks, after a random pause of up to
      ``_JITTER_S`` (nodes that starve together do not all turn to the origin at once, and
      one that sees a peer get something meanwhile stays off), or when the peers delivered
      nothing for ``_QUIET_S`` (peers that hold pieces but send none, seeding off); after
      that they stay ``_HOLD_S``;
    * pieces no connected peer holds get the highest priority and those one holds the lowest:
      a peer can only send what it holds, so the web seed is left the pieces new to the swarm.

    A node with no way to find peers uses its web seeds from the start."""

    def __init__(self, lt: Any, urls: list[str], *, peers_first: bool) -> None:
        self._lt = lt
        self._urls = urls
        self.on = bool(urls) and not peers_first
        self._not_before = 0.0
        self._starved_at: float | None = None
        self._next_s = 0.0
        self._priorities: list[int] = []

    @property
    def initial(self) -> list[str]:
        return list(self._urls) if self.on else []

    def steer(self, handle: Any, status: Any, *, quiet_s: float) -> None:
        now = time.monotonic()
        if not self._urls or status.is_finished or now < self._next_s:
            return
        self._next_s = now + _STEER_S
        have = status.pieces
        held = _held_by_peers(self._lt, handle, len(have))
        missing = [i for i, got in enumerate(have) if not got]
        from_peers = len(missing) if held is None else sum(1 for i in missing if i in held)
        self._prioritise(handle, have, held)
        if from_peers:
            self._starved_at = None
        elif self._starved_at is None:
            self._starved_at = now + random.uniform(0, _JITTER_S)
        if now < self._not_before:
            return
        if self.on and quiet_s < _QUIET_S and from_peers >= min(_ENOUGH, len(missing)):
            self._switch(handle, on=False, hold_s=0.0)
        elif not self.on and quiet_s >= _QUIET_S:
            self._switch(handle, on=True, hold_s=_HOLD_S)
        elif not self.on and self._starved_at is not None and now >= self._starved_at:
            self._switch(handle, on=True, hold_s=_MIN_ON_S)

    def _switch(self, handle: Any, *, on: bool, hold_s: float) -> None:
        for url in self._urls:
            (handle.add_url_seed if on else handle.remove_url_seed)(url)
        self.on, self._not_before = on, time.monotonic() + hold_s

    def _prioritise(self, handle: Any, have: list[bool], held: set[int] | None) -> None:
        priorities = [
            4 if got or held is None else (1 if i in held else 7) for i, got in enumerate(have)
        ]
        if priorities != self._priorities:
            handle.prioritize_pieces(priorities)
            self._priorities = priorities


def _held_by_peers(lt: Any, handle: Any, count: int) -> set[int] | None:
    """The pieces some connected BitTorrent peer holds; None when a peer holds them all."""
    held: set[int] = set()
    for peer in handle.get_peer_info():
        if peer.connection_type in (lt.peer_info.web_seed, lt.peer_info.http_seed):
            continue
        if peer.flags & lt.peer_info.seed:
            return None
        held.update(i for i, got in enumerate(peer.pieces) if got)
        if len(held) == count:
            return None
    return held


def _wait(swarm: Swarm, handle: Any, job: SwarmJob, seeds: _WebSeeds) -> None:
    """Until every piece is in and verified; ``SwarmUnavailableError`` after ``stall_s``
    without a verified byte, ``DownloadError`` when the caller stops the fetch."""
    states = swarm.lt.torrent_status
    checking = {states.checking_files, states.checking_resume_data}
    stall_s = swarm.options.stall_s
    reported = 0
    resumed: int | None = None
    last_change = reconnect_at = time.monotonic()
    while True:
        swarm.pump()
        status = handle.status()
        done = int(status.total_wanted_done)
        if resumed is None and status.state not in checking:
            resumed = done
            if done:
                _log.info("swarm: %s: resuming with %d bytes already verified", job.label, done)
        if done != reported:
            if job.progress is not None:
                job.progress(done - reported)
            reported, last_change = done, time.monotonic()
        if status.is_finished and done >= job.file.size:
            _log.info(
                "swarm: %s: %d bytes, %d of them from the network",
                job.label,
                done,
                int(status.total_payload_download),
            )
            return
        seeds.steer(handle, status, quiet_s=time.monotonic() - last_change)
        if time.monotonic() >= reconnect_at:
            # A peer that finished re-adds the file as a seed and drops its connections;
            # the named peers are asked again (libtorrent skips those still connected).
            swarm.connect_peers(handle)
            reconnect_at = time.monotonic() + _RECONNECT_S
        if job.should_stop is not None and job.should_stop():
            raise DownloadError(f"cannot download {job.label}: cancelled")
        if status.state not in checking and time.monotonic() - last_change > stall_s:
            raise SwarmUnavailableError(
                f"{job.label}: no verified byte from peers or web seeds for {stall_s:g} s"
            )
        time.sleep(_POLL_S)


def _check_digest(path: Path, digest: str) -> None:
    """The whole file's sha256 against the snapshot's digest, and its bytes made durable."""
    hasher = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
        os.fsync(handle.fileno())
    if "sha256:" + hasher.hexdigest() != digest:
        raise SwarmUnavailableError(
            f"the swarm's bytes for {digest} hash to sha256:{hasher.hexdigest()[:16]}… "
            "(the snapshot's piece hashes do not describe its digest)"
        )


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
