"""The node's BitTorrent session (libtorrent): one per process, shared by the downloads of
model files that carry ``bt`` and by the seeding of verified blobs while ``watch`` runs.

Where it sits: the model store's second download engine, beside ``reconciler.models.download``
(HTTP). The fetcher asks ``shared_swarm`` for the session when the node's ``p2p`` setting is
on; ``swarm_fetch`` downloads one file through it; the watch loop calls ``Swarm.seed`` after
each cycle and ``close_shared_swarm`` when it stops. This module is the libtorrent edge: no
libtorrent object or exception leaves it.

Why these settings: the session listens only where ``p2p_listen`` says and never on another
port (no retry on the next port, no system fallback), so a taken port is a visible failure
rather than a surprise; UPnP and NAT-PMP are off (a node does not open its router); DHT is on
only when both the snapshot and the node allow it. With seeding off the session unchokes
nobody, so it downloads but uploads nothing.

What it may not do: raise anything but ``SwarmUnavailableError`` for a session that cannot
run (the caller then uses HTTP); offer anything but the blobs it is given; let libtorrent
write a blob (seeded torrents are added in seed mode and upload mode: nothing is checked,
nothing is downloaded, the file is only read).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.core.documents import ModelFile, format_time
from reconciler.core.errors import ReconcilerError, TransientError
from reconciler.disk.atomic import write_atomic
from reconciler.models.layout import blob_hex

if TYPE_CHECKING:
    from reconciler.config.settings import Settings

__all__ = [
    "STATUS_NAME",
    "Swarm",
    "SwarmOptions",
    "SwarmUnavailableError",
    "close_shared_swarm",
    "read_swarm_status",
    "shared_swarm",
]

_log = logging.getLogger("reconciler.swarm")

STATUS_NAME = ".swarm.json"  # under models/: what `status` shows of the swarm
_LISTEN_WAIT_S = 3.0
_WEB_SEED_REQUEST_BYTES = 2 * 1024 * 1024


class SwarmUnavailableError(TransientError):
    """The swarm cannot be used (libtorrent missing, the port taken, no progress): the file is
    fetched over HTTP instead."""


@dataclass(frozen=True, kw_only=True)
class SwarmOptions:
    """The node's ``p2p_*`` settings, as the swarm uses them."""

    listen: str = "0.0.0.0:6881"
    seed: bool = True
    upload_rate: int = 0
    connections: int = 200
    peers: tuple[str, ...] = ()
    lsd: bool = True
    dht: bool = True
    # DHT nodes to join by; empty: libtorrent's own (public routers). A private network names
    # one or more of its nodes (any node that runs the DHT will do).
    dht_bootstrap: tuple[str, ...] = ()
    stall_s: float = 30.0
    # Tests and benchmarks put several nodes on one address; a real swarm does not need it.
    same_ip_peers: bool = False

    @classmethod
    def of(cls, settings: Settings) -> SwarmOptions | None:
        """None when the node's ``p2p`` setting is off."""
        if not settings.p2p:
            return None
        return cls(
            listen=settings.p2p_listen,
            seed=settings.p2p_seed,
            upload_rate=settings.p2p_upload_rate,
            connections=settings.p2p_connections,
            peers=settings.p2p_peers,
            lsd=settings.p2p_lsd,
            dht=settings.p2p_dht,
            dht_bootstrap=settings.p2p_dht_bootstrap,
            stall_s=settings.p2p_stall_s,
            same_ip_peers=_all_loopback(
                settings.p2p_listen, (*settings.p2p_peers, *settings.p2p_dht_bootstrap)
            ),
        )


def _all_loopback(listen: str, peers: Iterable[str]) -> bool:
    return all(a.startswith(("127.", "[::1]", "localhost")) for a in (listen, *peers))


def peer_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (the settings schema checked the form)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _import_libtorrent() -> Any:
    try:
        import libtorrent
    except ImportError as exc:
        raise SwarmUnavailableError(f"libtorrent is not installed ({exc})") from None
    return libtorrent


class Swarm:
    """One libtorrent session; see the module docstring. Thread-safe: downloads run on the
    fetcher's worker threads, seeding on the watch loop's."""

    def __init__(self, lt: Any, session: Any, options: SwarmOptions, status_path: Path) -> None:
        self.lt = lt
        self.options = options
        self._session = session
        self._status_path = status_path
        self._lock = threading.RLock()
        self._seeding: dict[str, Any] = {}  # hex → handle of a blob offered to peers
        self.hash_failures = 0
        self.banned_peers = 0
        self._live: list[Any] = []  # every torrent in the session, to sum its payload
        self._dht_on = False
        self._gone = [0, 0]  # payload (uploaded, downloaded) of torrents already removed

    @classmethod
    def open(cls, options: SwarmOptions, *, status_path: Path) -> Swarm:
        """A listening session, or ``SwarmUnavailableError`` (one line) if it cannot run."""
        lt = _import_libtorrent()
        try:
            session = lt.session(_settings_pack(lt, options))
        except RuntimeError as exc:
            raise SwarmUnavailableError(f"libtorrent would not start: {exc}") from None
        _limit_lan_peers(session, options)
        swarm = cls(lt, session, options, status_path)
        swarm._wait_listening()
        return swarm

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _LISTEN_WAIT_S
        while time.monotonic() < deadline:
            for alert in self._session.pop_alerts():
                if isinstance(alert, self.lt.listen_failed_alert):
                    self._session = None
                    raise SwarmUnavailableError(
                        f"cannot listen on {self.options.listen}: {alert.message()}"
                    )
            if self._session.is_listening():
                return
            time.sleep(0.05)
        raise SwarmUnavailableError(f"cannot listen on {self.options.listen}: no answer")

    @property
    def listen_port(self) -> int:
        return int(self._session.listen_port())

    # ------------------------------------------------------------------ torrents

    def torrent_info(self, file: ModelFile) -> Any:
        """The file's single-file v1 torrent, rebuilt from the snapshot alone (docs/contract.md
        §12): every node of the network builds the same one, so they share one info-hash."""
        bt = file.bt
        assert bt is not None  # callers check; a file without bt has no torrent
        info = {
            b"length": file.size,
            b"name": blob_hex(file.digest).encode("ascii"),
            b"piece length": bt.piece_length,
            b"pieces": bt.pieces,
        }
        return self.lt.torrent_info(self.lt.bdecode(self.lt.bencode({b"info": info})))

    def add(self, params: Any) -> Any:
        with self._lock:
            handle = self._session.add_torrent(params)
            self._live.append(handle)
            return handle

    def remove(self, handle: Any) -> None:
        with self._lock:
            status = handle.status()
            self._gone[0] += int(status.total_payload_upload)
            self._gone[1] += int(status.total_payload_download)
            self._live.remove(handle)
            self._session.remove_torrent(handle)

    def pump(self) -> None:
        """Read the session's alerts: count wrong pieces and banned peers. Any thread may
        call it; each alert is seen once."""
        with self._lock:
            if self._session is None:
                return
            for alert in self._session.pop_alerts():
                if isinstance(alert, self.lt.hash_failed_alert):
                    self.hash_failures += 1
                    _log.warning("swarm: %s", alert.message())
                elif isinstance(alert, self.lt.peer_ban_alert):
                    self.banned_peers += 1
                    _log.warning("swarm: %s", alert.message())

    def _payload(self, which: int) -> int:
        with self._lock:
            statuses = [h.status() for h in self._live]
            live = sum(
                int(s.total_payload_upload if which == 0 else s.total_payload_download)
                for s in statuses
            )
            return self._gone[which] + live

    @property
    def uploaded_bytes(self) -> int:
        """Payload sent to peers by this session, over every torrent it ever had."""
        return self._payload(0)

    @property
    def downloaded_bytes(self) -> int:
        """Payload received from peers and web seeds by this session."""
        return self._payload(1)

    # ------------------------------------------------------------------ seeding

    def seed(self, files: Iterable[ModelFile], blob_dir: Path) -> int:
        """Offer exactly the blobs of ``files`` that carry ``bt`` and exist in ``blob_dir``
        (verified: the store's index vouches for every name in it); stop offering the rest.
        With seeding off, nothing is offered. Returns how many are offered."""
        wanted: dict[str, ModelFile] = {}
        if self.options.seed:
            for file in files:
                hex_ = blob_hex(file.digest)
                if file.bt is not None and file.size > 0 and (blob_dir / hex_).is_file():
                    wanted.setdefault(hex_, file)
        with self._lock:
            for hex_ in [h for h in self._seeding if h not in wanted]:
                self.remove(self._seeding.pop(hex_))
            for hex_, file in wanted.items():
                if hex_ not in self._seeding:
                    self._seeding[hex_] = self.add(self._seed_params(file, blob_dir))
            count = len(self._seeding)
        self.write_status()
        return count

    def seed_one(self, file: ModelFile, blob_dir: Path) -> None:
        """Offer one blob just adopted (peers still downloading it need not wait a cycle)."""
        hex_ = blob_hex(file.digest)
        if not self.options.seed or file.bt is None:
            return
        with self._lock:
            if hex_ not in self._seeding and self._session is not None:
                self._seeding[hex_] = self.add(self._seed_params(file, blob_dir))
                self.connect_peers(self._seeding[hex_])  # they may still be downloading it

    def _seed_params(self, file: ModelFile, blob_dir: Path) -> Any:
        lt = self.lt
        params = lt.add_torrent_params()
        params.ti = self.torrent_info(file)
        params.save_path = str(blob_dir)
        # seed_mode: trust the store's verification (no re-read of every blob at start);
        # upload_mode: never request a piece, so libtorrent has no reason to write the file.
        flags = lt.torrent_flags.seed_mode | lt.torrent_flags.upload_mode
        params.flags = flags | self.discovery_flags(file)
        params.trackers = list(file.bt.trackers) if file.bt else []
        return params

    def discovery_flags(self, file: ModelFile) -> int:
        """DHT only where the snapshot and the node allow it; LSD where the node does."""
        lt = self.lt
        flags = 0
        if not (self.options.dht and file.bt is not None and file.bt.dht):
            flags |= lt.torrent_flags.disable_dht
        elif not self._dht_on:
            # The session joins the DHT only once a snapshot asks for it: until then a node
            # sends nothing to the DHT's public bootstrap nodes.
            with self._lock:
                self._session.apply_settings({"enable_dht": True})
                self._dht_on = True
        if not self.options.lsd:
            flags |= lt.torrent_flags.disable_lsd
        return flags

    def can_find_peers(self, file: ModelFile) -> bool:
        """Whether this node has any way to find peers for ``file``."""
        bt = file.bt
        return bool(
            self.options.peers
            or self.options.lsd
            or (bt is not None and (bt.trackers or (bt.dht and self.options.dht)))
        )

    def connect_peers(self, handle: Any) -> None:
        for text in self.options.peers:
            handle.connect_peer(peer_endpoint(text))

    @property
    def seeding(self) -> int:
        with self._lock:
            return len(self._seeding)

    # ------------------------------------------------------------------ status

    def write_status(self) -> None:
        self.pump()
        _write_status(
            self._status_path,
            {
                "state": "on",
                "engine": f"libtorrent {self.lt.__version__}",
                "listen": f"{self.options.listen.rpartition(':')[0]}:{self.listen_port}",
                "seeding": self.seeding if self.options.seed else None,
                "uploaded_bytes": self.uploaded_bytes,
                "downloaded_bytes": self.downloaded_bytes,
                "hash_failures": self.hash_failures,
                "banned_peers": self.banned_peers,
                "fallback": _fallbacks.get(str(self._status_path)),
            },
        )

    def close(self) -> None:
        """Stop the session; its record says so (``status`` shows ``stopped``)."""
        with self._lock:
            if self._session is None:
                return
            uploaded, downloaded = self.uploaded_bytes, self.downloaded_bytes
            self._seeding.clear()
            self._live.clear()
            self._session = None
        _write_status(
            self._status_path,
            {
                "state": "stopped",
                "engine": f"libtorrent {self.lt.__version__}",
                "seeding": 0 if self.options.seed else None,
                "uploaded_bytes": uploaded,
                "downloaded_bytes": downloaded,
                "hash_failures": self.hash_failures,
                "banned_peers": self.banned_peers,
                "fallback": _fallbacks.get(str(self._status_path)),
            },
        )


def _limit_lan_peers(session: Any, options: SwarmOptions) -> None:
    """libtorrent exempts peers on the local network from the upload cap and the unchoke
    slots; here a LAN peer is held to the same cap (in a bucket of its own), and with seeding
    off it is never unchoked either."""
    local = session.get_peer_class(session.local_peer_class_id)
    local["ignore_unchoke_slots"] = False
    local["upload_limit"] = options.upload_rate
    session.set_peer_class(session.local_peer_class_id, local)


def _settings_pack(lt: Any, options: SwarmOptions) -> dict[str, Any]:
    category = lt.alert_category
    bootstrap = {"dht_bootstrap_nodes": ",".join(options.dht_bootstrap)}
    return {
        **(bootstrap if options.dht_bootstrap else {}),
        "listen_interfaces": options.listen,
        "listen_system_port_fallback": False,
        "max_retry_port_bind": 0,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_dht": False,  # turned on by the first torrent that may use it
        "enable_lsd": options.lsd,
        "connections_limit": options.connections,
        "upload_rate_limit": options.upload_rate,
        # Seeding off: nobody is unchoked, so nothing is uploaded; downloads still work.
        "unchoke_slots_limit": -1 if options.seed else 0,
        "allow_multiple_connections_per_ip": options.same_ip_peers,
        "ban_web_seeds": True,
        # TCP only: uTP's congestion control (LEDBAT) yields to every TCP flow, so beside the
        # web seeds' downloads the peers' transfers crawl (a 3-node loopback swarm took the
        # origin's 2.4x the file with uTP, 1.7x without).
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        # A web seed answers one Range request per call, and HTTP cannot cancel part of one:
        # short requests keep the origin from sending pieces that peers delivered meanwhile.
        "urlseed_max_request_bytes": _WEB_SEED_REQUEST_BYTES,
        "urlseed_pipeline_size": 2,
        "user_agent": "reconciler",
        "alert_mask": category.error | category.status | category.peer,
    }


# ---------------------------------------------------------------------- the process's session

_shared: dict[str, Swarm] = {}
_fallbacks: dict[str, dict[str, str]] = {}  # status path → the last fallback, logged once
_shared_lock = threading.Lock()


def shared_swarm(options: SwarmOptions, *, status_path: Path) -> Swarm | None:
    """The process's session for this store, opened on first use; None (HTTP, logged once per
    reason, shown in ``status``) when it cannot run."""
    key = str(status_path)
    with _shared_lock:
        swarm = _shared.get(key)
        if swarm is not None and swarm.options == options:
            return swarm
        if swarm is not None:
            swarm.close()
            del _shared[key]
        try:
            swarm = Swarm.open(options, status_path=status_path)
        except SwarmUnavailableError as exc:
            note_fallback(status_path, exc)
            return None
        _shared[key] = swarm
    swarm.write_status()
    return swarm


def note_fallback(status_path: Path, exc: ReconcilerError) -> None:
    """Record that a file went over HTTP instead: logged once per reason, kept for ``status``."""
    reason = exc.one_line()
    key = str(status_path)
    previous = _fallbacks.get(key)
    if previous is None or previous["reason"] != reason:
        _log.warning("swarm: falling back to HTTP: %s", reason)
    _fallbacks[key] = {"reason": reason, "at": format_time(time.time())}
    swarm = _shared.get(key)
    if swarm is not None:
        swarm.write_status()
    else:
        _write_status(status_path, {"state": "fallback", "fallback": _fallbacks[key]})


def close_shared_swarm() -> None:
    """Stop every session of this process (the watch loop, when it stops)."""
    with _shared_lock:
        for swarm in _shared.values():
            swarm.close()
        _shared.clear()


def _write_status(path: Path, document: dict[str, Any]) -> None:
    import json

    document = {**document, "updated_at": format_time(time.time())}
    try:
        write_atomic(path, json.dumps(document, sort_keys=True).encode("utf-8"))
    except (OSError, ReconcilerError) as exc:
        _log.debug("swarm: cannot write %s: %s", path, exc)


def read_swarm_status(models_dir: Path) -> dict[str, Any] | None:
    """What the last swarm of this node recorded (``status``), or None."""
    import json

    try:
        document = json.loads((models_dir / STATUS_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
