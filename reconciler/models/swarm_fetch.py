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
        _download(swarm, job, staging)
        _check_digest(target, file.digest)
    except SwarmUnavailableError as exc:
        note_fallback(status_path, exc)
        _discard(target)
        return False
    blobs.adopt(target, blob_hex(file.digest), synced=True)
    swarm.seed_one(file, blobs.dir)
    swarm.write_status()
    return True


def _download(swarm: Swarm, job: SwarmJob, staging: Path) -> None:
    file = job.file
    lt = swarm.lt
    params = lt.add_torrent_params()
    params.ti = swarm.torrent_info(file)
    params.save_path = str(staging)
    seeds = web_seeds(file, base_url=job.base_url, local_mirrors=job.local_mirrors)
    params.url_seeds = seeds
    params.trackers = list(file.bt.trackers) if file.bt else []
    params.flags = swarm.discovery_flags(file)  # not auto-managed: never queued behind others
    handle = swarm.add(params)
    try:
        swarm.connect_peers(handle)
        _wait(swarm, handle, job, _WebSeeds(swarm.lt, seeds))
    finally:
        swarm.remove(handle)


class _WebSeeds:
    """The mirrors as web seeds only while the peers cannot supply the rest.

    A web seed is one more source to libtorrent, which would keep pulling from it at full
    speed while peers hold every missing piece: each node of a swarm would then take most of
    the file from the origin. So the web seeds go away while every missing piece is held by a
    connected peer, and come back when a missing piece is held by none or the peers delivered
    nothing for ``_QUIET_S``; after such a return they stay ``_HOLD_S``, so that peers that
    hold pieces but send none (seeding off) cannot make them flap."""

    def __init__(self, lt: Any, urls: list[str]) -> None:
        self._lt = lt
        self._urls = urls
        self.on = bool(urls)
        self._hold_until = 0.0

    def steer(self, handle: Any, status: Any, *, quiet_s: float) -> None:
        now = time.monotonic()
        if not self._urls or status.is_finished or now < self._hold_until:
            return
        offered = _peers_offer_the_rest(self._lt, handle, status)
        if self.on and offered and quiet_s < _QUIET_S:
            for url in self._urls:
                handle.remove_url_seed(url)
            self.on, self._hold_until = False, now + _QUIET_S
        elif not self.on and (not offered or quiet_s >= _QUIET_S):
            for url in self._urls:
                handle.add_url_seed(url)
            self.on, self._hold_until = True, now + (_HOLD_S if offered else _QUIET_S)


def _peers_offer_the_rest(lt: Any, handle: Any, status: Any) -> bool:
    """True when every piece still missing is held by a connected BitTorrent peer."""
    have = status.pieces
    missing = [i for i, got in enumerate(have) if not got]
    held: list[Any] = []
    for peer in handle.get_peer_info():
        if peer.connection_type in (lt.peer_info.web_seed, lt.peer_info.http_seed):
            continue
        if peer.flags & lt.peer_info.seed:
            return True
        held.append(peer.pieces)
    return bool(held) and all(any(bits[i] for bits in held) for i in missing)


def _wait(swarm: Swarm, handle: Any, job: SwarmJob, seeds: _WebSeeds) -> None:
    """Until every piece is in and verified; ``SwarmUnavailableError`` after ``stall_s``
    without a verified byte, ``DownloadError`` when the caller stops the fetch."""
    states = swarm.lt.torrent_status
    checking = {states.checking_files, states.checking_resume_data}
    stall_s = swarm.options.stall_s
    reported = 0
    resumed: int | None = None
    last_change = time.monotonic()
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
