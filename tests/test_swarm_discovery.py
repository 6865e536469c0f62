"""How nodes of a swarm find each other (issue 14, discovery), with real libtorrent sessions on
127.0.0.1: through a real tracker (Debian's opentracker) named by the snapshot, through the
DHT, and by local service discovery (LSD).

Every node here names no peer (``p2p_peers`` empty) and has every way of discovery off but
the one under test, and the node that must find a peer has no working web seed (its mirror
URL answers nothing): the only way it can get a byte is from a peer it discovered. Each test
looks at the blob on disk, the swarm's own record (``models/.swarm.json``) and what the first
node uploaded; each way has a control in which the second node finds nobody.

LSD is libtorrent's multicast to 239.192.152.143:6771 on the interfaces a session listens on.
The loopback interface here shows no ``MULTICAST`` flag, yet Linux delivers the group's
datagrams between sockets on 127.0.0.1 all the same (seen with libtorrent 2.1 on Linux 6.x,
also in a fresh network namespace whose ``lo`` lacks the flag), so the LSD test needs neither
root nor a change to the machine's network. The nodes of other tests running beside it on the
same machine may hear its announcements, and it theirs: each test's file is random bytes, so
no two share an info-hash and nobody connects to anybody else's node.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.documents import ModelFile, ModelSpec, Snapshot
from reconciler.core.paths import NodePaths
from reconciler.models.store import ModelStore
from reconciler.models.swarm import close_shared_swarm, read_swarm_status
from reconciler.network.torrents import with_torrents
from tests.support.fileserver import FileServer
from tests.support.tracker import Tracker, opentracker_installed
from tests.test_swarm import (
    DEAD_URL,
    MIB,
    assert_installed,
    fetch,
    options,
    snapshot_with,
    swarm_of,
)

lt = pytest.importorskip("libtorrent")


@pytest.fixture(autouse=True)
def _sessions_closed() -> Iterator[None]:
    yield
    close_shared_swarm()


def model_with(folder: Path, data: bytes, *, urls: list[str], p2p: dict[str, Any]) -> ModelSpec:
    """A one-file model whose snapshot carries ``p2p`` (trackers, dht), ``bt`` by publish's code."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(data)
    entry = {
        "path": "w.bin",
        "size": len(data),
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "urls": urls,
    }
    document, filled = with_torrents({**snapshot_with(entry), "p2p": p2p}, folder)
    assert filled.filled == 1
    return Snapshot.from_payload(document).models[0]


def info_hash(file: ModelFile) -> str:
    """The v1 info-hash every node computes for ``file`` (docs/contract.md §12), computed
    here on its own: what an operator lists in the tracker's whitelist."""
    assert file.bt is not None
    info = {
        b"length": file.size,
        b"name": file.digest.removeprefix("sha256:").encode(),
        b"piece length": file.bt.piece_length,
        b"pieces": file.bt.pieces,
    }
    return hashlib.sha1(lt.bencode(info), usedforsecurity=False).hexdigest()


def wait_for(condition: Any, what: str, *, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ---------------------------------------------------------------------- tracker


@pytest.mark.skipif(not opentracker_installed(), reason="opentracker (.ci/setup installs it)")
@pytest.mark.parametrize("scheme", ["http", "udp"])
def test_two_nodes_find_each_other_only_through_the_snapshots_tracker(
    tmp_path: Path, scheme: str
) -> None:
    data = os.urandom(6 * MIB + 7)
    with FileServer(tmp_path / "mirror") as mirror:
        mirror.write("w.bin", data)
        probe = model_with(tmp_path / "probe", data, urls=[DEAD_URL], p2p={})
        with Tracker(tmp_path / "tracker", [info_hash(probe.files[0])]) as tracker:
            url = tracker.announce_url if scheme == "http" else tracker.udp_announce_url
            p2p = {"trackers": [url], "dht": False}
            # The first node has the mirror as its web seed; once it holds the file it seeds
            # it and announces it to the tracker.
            first_model = model_with(
                tmp_path / "files", data, urls=[mirror.url_for("w.bin")], p2p=p2p
            )
            first_store = ModelStore(NodePaths(tmp_path / "first"))
            fetch(first_store, first_model, options())
            first = swarm_of(first_store, options())
            assert first.seeding == 1
            hash_ = info_hash(first_model.files[0])
            wait_for(lambda: tracker.seeders(hash_) == 1, "the first node never announced")
            served_to_first = mirror.stats.body_bytes("/w.bin")
            # The second node: the same torrent, a mirror that answers nothing, no named peer,
            # no LSD, no DHT. The tracker is its only way to the first node.
            second_model = model_with(tmp_path / "files2", data, urls=[DEAD_URL], p2p=p2p)
            second_store = ModelStore(NodePaths(tmp_path / "second"))
            fetch(second_store, second_model, options(stall_s=15.0))
            assert_installed(second_store, second_model, data)
            assert mirror.stats.body_bytes("/w.bin") == served_to_first  # nothing more
            assert first.uploaded_bytes >= len(data)
            status = read_swarm_status(second_store.root)
            assert status is not None and status["fallback"] is None
            assert status["downloaded_bytes"] == len(data)
            # Now both seed it, and the tracker knows both.
            wait_for(lambda: tracker.seeders(hash_) == 2, "the second node never announced")


@pytest.mark.skipif(not opentracker_installed(), reason="opentracker (.ci/setup installs it)")
def test_a_tracker_that_does_not_list_the_torrent_finds_no_peer(tmp_path: Path) -> None:
    """The control of the test above: a tracker whose whitelist lacks the torrent hands out
    nobody, and the second node gets no byte (it falls back to HTTP, which answers nothing)."""
    from reconciler.core.errors import DownloadError

    data = os.urandom(5 * MIB)
    with FileServer(tmp_path / "mirror") as mirror, Tracker(tmp_path / "tracker", []) as tracker:
        mirror.write("w.bin", data)
        p2p = {"trackers": [tracker.announce_url], "dht": False}
        first_model = model_with(tmp_path / "files", data, urls=[mirror.url_for("w.bin")], p2p=p2p)
        first_store = ModelStore(NodePaths(tmp_path / "first"))
        fetch(first_store, first_model, options())
        assert swarm_of(first_store, options()).seeding == 1
        second_model = model_with(tmp_path / "files2", data, urls=[DEAD_URL], p2p=p2p)
        second_store = ModelStore(NodePaths(tmp_path / "second"))
        with pytest.raises(DownloadError, match=r"w\.bin"):
            fetch(second_store, second_model, options(stall_s=3.0))
        assert tracker.seeders(info_hash(first_model.files[0])) == 0
    status = read_swarm_status(second_store.root)
    assert status is not None and "no verified byte" in status["fallback"]["reason"]
    assert swarm_of(first_store, options()).uploaded_bytes == 0


# ---------------------------------------------------------------------- DHT


class DhtNode:
    """A libtorrent session on 127.0.0.1 that runs the DHT and holds no torrent: the node the
    others join the DHT by (``p2p_dht_bootstrap``), as an always-on node of a private network
    would be. It sees who announces what to it."""

    def __init__(self) -> None:
        self.session = lt.session(
            {
                "listen_interfaces": "127.0.0.1:0",
                "enable_dht": True,
                "dht_bootstrap_nodes": "",  # nobody: it is the first node
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "alert_mask": lt.alert_category.dht,
            }
        )
        self.announced: set[str] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.session.listen_port()}"

    def has_announce(self, info_hash: str) -> bool:
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.dht_announce_alert):
                self.announced.add(str(alert.info_hash))
        return info_hash in self.announced


def test_the_dht_bootstrap_setting_reaches_the_session_and_is_checked(tmp_path: Path) -> None:
    from reconciler.config.settings import load_settings
    from reconciler.core.errors import SettingsError
    from reconciler.models.swarm import SwarmOptions

    config = tmp_path / "settings.toml"
    config.write_text('p2p = true\np2p_dht_bootstrap = ["10.0.0.5:6881", "[fd00::1]:6881"]\n')
    opts = SwarmOptions.of(load_settings(config=str(config), environ={}))
    assert opts is not None and opts.dht_bootstrap == ("10.0.0.5:6881", "[fd00::1]:6881")
    assert not opts.same_ip_peers
    env = {"RECONCILER_P2P_DHT_BOOTSTRAP": "127.0.0.1:7001, 127.0.0.1:7002"}
    loopback = SwarmOptions.of(
        load_settings(config=str(config), environ=env, overrides={"p2p_listen": "127.0.0.1:0"})
    )
    assert loopback is not None and loopback.dht_bootstrap == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert loopback.same_ip_peers  # every node on one address: a test's or a benchmark's swarm
    config.write_text('p2p_dht_bootstrap = ["router.example"]\n')
    with pytest.raises(SettingsError, match="p2p_dht_bootstrap/0"):
        load_settings(config=str(config), environ={})


def test_a_node_finds_its_peer_through_the_dht_alone(tmp_path: Path) -> None:
    data = os.urandom(6 * MIB + 3)
    router = DhtNode()
    dht = options(dht=True, dht_bootstrap=(router.address,))
    p2p = {"trackers": [], "dht": True}
    with FileServer(tmp_path / "mirror") as mirror:
        mirror.write("w.bin", data)
        first_model = model_with(tmp_path / "files", data, urls=[mirror.url_for("w.bin")], p2p=p2p)
        first_store = ModelStore(NodePaths(tmp_path / "first"))
        fetch(first_store, first_model, dht)
        first = swarm_of(first_store, dht)
        assert first.seeding == 1
        hash_ = info_hash(first_model.files[0])
        wait_for(lambda: router.has_announce(hash_), "the first node never announced to the DHT")
        served_to_first = mirror.stats.body_bytes("/w.bin")
    # A mirror that answers nothing, no named peer, no tracker, no LSD: only the DHT.
    second_model = model_with(tmp_path / "files2", data, urls=[DEAD_URL], p2p=p2p)
    second_store = ModelStore(NodePaths(tmp_path / "second"))
    fetch(second_store, second_model, options(dht=True, dht_bootstrap=(router.address,)))
    assert_installed(second_store, second_model, data)
    assert served_to_first >= len(data)
    assert first.uploaded_bytes >= len(data)
    status = read_swarm_status(second_store.root)
    assert status is not None and status["fallback"] is None
    assert status["downloaded_bytes"] == len(data)


def test_without_the_nodes_dht_setting_the_dht_finds_nobody(tmp_path: Path) -> None:
    """The control: the same swarm, but the second node's ``p2p_dht`` is off (the snapshot
    still allows the DHT): it finds no peer and gets no byte."""
    from reconciler.core.errors import DownloadError

    data = os.urandom(5 * MIB)
    router = DhtNode()
    dht = options(dht=True, dht_bootstrap=(router.address,))
    p2p = {"trackers": [], "dht": True}
    with FileServer(tmp_path / "mirror") as mirror:
        mirror.write("w.bin", data)
        first_model = model_with(tmp_path / "files", data, urls=[mirror.url_for("w.bin")], p2p=p2p)
        first_store = ModelStore(NodePaths(tmp_path / "first"))
        fetch(first_store, first_model, dht)
        hash_ = info_hash(first_model.files[0])
        wait_for(lambda: router.has_announce(hash_), "the first node never announced to the DHT")
    second_model = model_with(tmp_path / "files2", data, urls=[DEAD_URL], p2p=p2p)
    second_store = ModelStore(NodePaths(tmp_path / "second"))
    off = options(dht=False, dht_bootstrap=(router.address,), stall_s=3.0)
    with pytest.raises(DownloadError, match=r"w\.bin"):
        fetch(second_store, second_model, off)
    assert swarm_of(first_store, dht).uploaded_bytes == 0
    assert not (second_store.root / "blobs" / "sha256" / first_model.files[0].digest[7:]).exists()


# ---------------------------------------------------------------------- local service discovery


def first_node_on_the_lan(tmp_path: Path, mirror: FileServer, data: bytes) -> ModelStore:
    """A node with LSD on that fetched the file from its web seed and now seeds it."""
    mirror.write("w.bin", data)
    p2p = {"trackers": [], "dht": False}
    model = model_with(tmp_path / "files", data, urls=[mirror.url_for("w.bin")], p2p=p2p)
    store = ModelStore(NodePaths(tmp_path / "first"))
    fetch(store, model, options(lsd=True))
    assert swarm_of(store, options(lsd=True)).seeding == 1
    return store


def test_a_node_finds_its_peer_by_local_service_discovery(tmp_path: Path) -> None:
    data = os.urandom(6 * MIB + 5)
    with FileServer(tmp_path / "mirror") as mirror:
        first_store = first_node_on_the_lan(tmp_path, mirror, data)
        served_to_first = mirror.stats.body_bytes("/w.bin")
        # A mirror that answers nothing, no named peer, no tracker, no DHT: only LSD.
        second_model = model_with(
            tmp_path / "files2", data, urls=[DEAD_URL], p2p={"trackers": [], "dht": False}
        )
        second_store = ModelStore(NodePaths(tmp_path / "second"))
        fetch(second_store, second_model, options(lsd=True, stall_s=10.0))
        assert_installed(second_store, second_model, data)
        assert mirror.stats.body_bytes("/w.bin") == served_to_first  # nothing more
    assert served_to_first >= len(data)
    assert swarm_of(first_store, options(lsd=True)).uploaded_bytes >= len(data)
    status = read_swarm_status(second_store.root)
    assert status is not None and status["fallback"] is None
    assert status["downloaded_bytes"] == len(data)


def test_without_the_nodes_lsd_setting_the_lan_finds_nobody(tmp_path: Path) -> None:
    """The control: the same two nodes, but the second node's ``p2p_lsd`` is off: it hears
    no announcement, makes none, and gets no byte."""
    from reconciler.core.errors import DownloadError

    data = os.urandom(5 * MIB)
    with FileServer(tmp_path / "mirror") as mirror:
        first_store = first_node_on_the_lan(tmp_path, mirror, data)
        second_model = model_with(
            tmp_path / "files2", data, urls=[DEAD_URL], p2p={"trackers": [], "dht": False}
        )
        second_store = ModelStore(NodePaths(tmp_path / "second"))
        with pytest.raises(DownloadError, match=r"w\.bin"):
            fetch(second_store, second_model, options(lsd=False, stall_s=3.0))
    assert swarm_of(first_store, options(lsd=True)).uploaded_bytes == 0
    assert not (second_store.root / "blobs" / "sha256" / second_model.files[0].digest[7:]).exists()
    status = read_swarm_status(second_store.root)
    assert status is not None and status["fallback"] is not None
