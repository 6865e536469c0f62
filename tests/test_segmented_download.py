"""Segmented downloads against real servers on 127.0.0.1: nginx capping each connection
(``limit_rate``), and the test ``FileServer`` playing mirrors that ignore ``Range``, stall, send
wrong bytes in one chunk or close connections; then a SIGKILL in the middle and a resume.

Every test looks at the bytes on disk (and, through the store, the index), and at what the
servers sent. Files are small and splits are small so that the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from bench.nginx_origin import NginxOrigin, start_nginx
from reconciler.cli import cli
from reconciler.config.settings import Settings
from reconciler.core.documents import ModelChunks, ModelFile, ModelSpec, Snapshot
from reconciler.core.errors import DownloadError, HashMismatchError, SettingsError
from reconciler.core.paths import NodePaths
from reconciler.history.node import Node
from reconciler.models.download import download_file, new_client
from reconciler.models.limits import DownloadLimits
from reconciler.models.mirrors import mirror_host, mirror_tally, read_mirror_totals
from reconciler.models.partial import PartsRecord, record_path
from reconciler.models.progress import ProgressReporter
from reconciler.models.store import ModelStore
from reconciler.network.publish import with_chunks
from reconciler.report.node_metrics import node_metrics
from tests.support.fileserver import Fault, FileServer
from tests.support.signing import base_snapshot

MIB = 1024 * 1024
SIZE = 6 * MIB + 12_345  # not a multiple of any chunk or piece
LIMITS = DownloadLimits(
    min_split_bytes=256 * 1024, piece_bytes=1 * MIB, stall_s=0.6, connections_per_file=6
)
ROOT = Path(__file__).resolve().parents[1]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunk_digests(data: bytes, size: int) -> tuple[str, ...]:
    return tuple(digest(data[i : i + size]) for i in range(0, len(data), size))


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with new_client() as c:
        yield c


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxOrigin]:
    origin = start_nginx(tmp_path / "www", tmp_path / "nginx", limit_rate="4m", log_bytes=True)
    if origin is None:
        pytest.skip("nginx is not installed (.ci/setup installs nginx-light)")
    (tmp_path / "www").mkdir(exist_ok=True)
    yield origin
    origin.close()


def fetch(
    client: httpx.Client,
    data: bytes,
    dest: Path,
    *urls: str,
    limits: DownloadLimits = LIMITS,
    chunk: int | None = None,
) -> list[int]:
    deltas: list[int] = []
    download_file(
        client,
        urls=list(urls),
        base_url=None,
        dest_partial=dest,
        size=len(data),
        digest=digest(data),
        progress=deltas.append,
        deadline_s=30.0,
        label="demo:v1/big.bin",
        limits=limits,
        chunk_bytes=chunk,
        chunk_digests=chunk_digests(data, chunk) if chunk else (),
    )
    return deltas


# --------------------------------------------------------------- the fast path


def test_many_small_files_come_over_a_few_kept_alive_connections_into_the_index(
    nginx: NginxOrigin, client: httpx.Client, tmp_path: Path
) -> None:
    contents = {f"s/{i:03d}.bin": os.urandom(1024 + 97 * i) for i in range(120)}
    files = []
    for path, data in contents.items():
        (nginx.root / path).parent.mkdir(parents=True, exist_ok=True)
        (nginx.root / path).write_bytes(data)
        files.append(ModelFile(path=path, size=len(data), digest=digest(data), urls=(path,)))
    model = ModelSpec(name="small", version="v1", files=tuple(files))
    state = tmp_path / "state"
    store = ModelStore(NodePaths(state))

    store.ensure([model], client=client, base_url=nginx.url, concurrency=4)

    tree = store.tree_path(model)
    assert all((tree / path).read_bytes() == data for path, data in contents.items())
    index = json.loads((state / "models" / ".index.json").read_text())
    assert {f.digest.removeprefix("sha256:") for f in files} <= index["blobs"].keys()
    assert not list((state / "work" / "models" / "partial").iterdir())
    # One request per file, on connections kept alive: not one connection per file.
    assert [status for status, _sent, _range in nginx.requests()] == [200] * len(files)
    assert len(nginx.connections()) <= 8


def test_capped_nginx_is_beaten_by_several_connections_and_the_store_records_it(
    nginx: NginxOrigin, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    (nginx.root / "big.bin").write_bytes(payload)
    file = ModelFile(path="big.bin", size=SIZE, digest=digest(payload), urls=("big.bin",))
    model = ModelSpec(name="big", version="v1", files=(file,))
    store = ModelStore(NodePaths(tmp_path / "state"))
    reporter = ProgressReporter(stream=open(os.devnull, "w"), interactive=True)  # noqa: SIM115
    one_connection_s = SIZE / (4 * MIB)

    started = time.monotonic()
    store.ensure(
        [model], client=client, base_url=nginx.url, limits=LIMITS, progress_reporter=reporter
    )
    took = time.monotonic() - started

    assert (store.tree_path(model) / "big.bin").read_bytes() == payload
    hex_ = file.digest.removeprefix("sha256:")
    index = json.loads((tmp_path / "state" / "models" / ".index.json").read_text())
    assert hex_ in index["blobs"]
    assert not list((tmp_path / "state" / "work" / "models" / "partial").iterdir())
    ranges = [asked for status, _sent, asked in nginx.requests() if status == 206]
    assert len(ranges) >= 4  # split, not one stream
    assert nginx.body_bytes_sent() <= SIZE + 2 * MIB  # little sent twice (splits of tails)
    assert took < one_connection_s / 2, f"{took:.2f} s, one connection: {one_connection_s:.2f} s"
    assert reporter._connections == 0  # every connection opened was reported closed


def test_mirror_that_ignores_range_is_used_for_the_whole_file(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", ignore_range=True)
    dest = tmp_path / "p"

    deltas = fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert dest.read_bytes() == payload
    assert sum(deltas) == SIZE
    assert set(file_server.stats.statuses("w.bin")) == {200}
    assert not record_path(dest).exists()


def test_mirror_that_ignores_range_is_left_out_while_another_honours_it(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("a/w.bin", payload)
    file_server.write("b/w.bin", payload)
    file_server.faults.set("a/w.bin", ignore_range=True)
    dest = tmp_path / "p"

    fetch(client, payload, dest, file_server.url_for("a/w.bin"), file_server.url_for("b/w.bin"))

    assert dest.read_bytes() == payload
    assert file_server.stats.requests("a/w.bin") <= LIMITS.initial_connections
    assert set(file_server.stats.statuses("b/w.bin")) == {206}


# ----------------------------------------------------------------- bad mirrors


def test_stalled_mirror_costs_a_re_request_from_the_other_mirror(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("a/w.bin", payload)
    file_server.write("b/w.bin", payload)
    file_server.faults.set("a/w.bin", stall_after=100_000)
    dest = tmp_path / "p"
    started = time.monotonic()

    fetch(client, payload, dest, file_server.url_for("a/w.bin"), file_server.url_for("b/w.bin"))

    assert dest.read_bytes() == payload
    assert time.monotonic() - started < 3 * LIMITS.stall_s + 3.0
    # What the stalled mirror got out was kept; nothing was asked twice beyond it.
    total = file_server.stats.body_bytes("a/w.bin") + file_server.stats.body_bytes("b/w.bin")
    assert total <= SIZE + 2 * MIB


def test_stalls_of_the_only_mirror_never_drop_it_and_the_file_completes(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    # More stalls in a row than ``mirror_errors``: counted as errors they would drop the
    # file's only mirror and fail the download.
    stalls = [Fault(stall_after=64 * 1024)] * (2 * LIMITS.mirror_errors + 1)
    file_server.faults.queue("w.bin", *stalls)
    dest = tmp_path / "p"
    before = mirror_tally().figures()[1].get(mirror_host(file_server.url), 0)

    fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert dest.read_bytes() == payload
    assert not record_path(dest).exists()
    assert file_server.stats.requests("w.bin") > len(stalls)  # every stall was asked again
    # The bytes each stalled request delivered were kept: little was sent twice.
    assert file_server.stats.body_bytes("w.bin") <= SIZE + 2 * MIB
    assert mirror_tally().figures()[1].get(mirror_host(file_server.url), 0) == before


def test_wrong_bytes_in_one_chunk_cost_only_that_chunk(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    chunk = 256 * 1024
    bad = bytearray(payload)
    bad[5 * chunk + 77] ^= 0xFF  # one byte in chunk 5
    file_server.write("good/w.bin", payload)
    file_server.faults.set("bad/w.bin", body=bytes(bad))
    dest = tmp_path / "p"

    deltas = fetch(
        client,
        payload,
        dest,
        file_server.url_for("bad/w.bin"),
        file_server.url_for("good/w.bin"),
        chunk=chunk,
    )

    assert dest.read_bytes() == payload
    assert sum(deltas) == SIZE
    assert min(deltas) >= -LIMITS.piece_bytes  # thrown away: at most one segment's chunks
    # The bad mirror served its first segments (those before chunk 5 were good and kept),
    # then was dropped: it was asked at most once per connection that tried it.
    assert file_server.stats.requests("bad/w.bin") <= LIMITS.connections_per_file
    assert file_server.stats.body_bytes("good/w.bin") < SIZE


def test_wrong_bytes_without_chunk_digests_retry_mirror_by_mirror(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    bad = bytearray(payload)
    bad[SIZE // 2] ^= 0xFF
    file_server.write("good/w.bin", payload)
    file_server.faults.set("bad/w.bin", body=bytes(bad))
    dest = tmp_path / "p"

    fetch(
        client, payload, dest, file_server.url_for("bad/w.bin"), file_server.url_for("good/w.bin")
    )

    assert dest.read_bytes() == payload
    assert not record_path(dest).exists()


def test_only_mirror_with_wrong_bytes_is_a_hash_mismatch_that_leaves_nothing(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    bad = bytearray(payload)
    bad[123] ^= 0xFF
    file_server.faults.set("bad/w.bin", body=bytes(bad))
    dest = tmp_path / "p"

    with pytest.raises(HashMismatchError, match="digest mismatch"):
        fetch(client, payload, dest, file_server.url_for("bad/w.bin"))

    assert not dest.exists()
    assert not record_path(dest).exists()


def test_connections_closed_at_random_still_give_the_exact_file(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    cuts = [Fault(cut_after=n) for n in (70_000, 1, 300_000, 0, 123_456, 50_000, 9_999, 200_000)]
    file_server.faults.queue("w.bin", *cuts)
    dest = tmp_path / "p"
    before = mirror_tally().figures()[1].get(mirror_host(file_server.url), 0)

    fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert dest.read_bytes() == payload
    # Bytes that arrived before a cut were kept: little was sent twice.
    assert file_server.stats.body_bytes("w.bin") <= SIZE + 2 * MIB
    errors = mirror_tally().figures()[1].get(mirror_host(file_server.url), 0) - before
    assert errors >= 1


def test_a_cut_mid_chunk_keeps_what_arrived_and_asks_only_for_the_rest(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    chunk = 1 * MIB
    file_server.write("w.bin", payload)
    # Two requests cut inside their first chunk: what they got waits on disk for its digest.
    file_server.faults.queue("w.bin", Fault(cut_after=300_000), Fault(cut_after=700_000))
    dest = tmp_path / "p"
    limits = replace(LIMITS, stall_s=3.0)  # no segment looks slow on a busy host

    deltas = fetch(client, payload, dest, file_server.url_for("w.bin"), limits=limits, chunk=chunk)

    assert dest.read_bytes() == payload
    assert not record_path(dest).exists()
    assert min(deltas) >= 0  # nothing received was thrown away
    # The 1,000,000 bytes the cut requests got were not asked again (the rest of each chunk
    # was, and hashed with its head read back from disk).
    assert file_server.stats.body_bytes("w.bin") <= SIZE + 200_000
    starts = [int(h["range"][6:].split("-")[0]) for h in file_server.stats.headers("w.bin")]
    # Each cut's rest was asked from where its bytes stopped, not from its chunk's start.
    assert sum(1 for at in starts if at % chunk) >= 2


def test_store_passes_chunk_digests_from_the_snapshot(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    chunk = 512 * 1024
    file_server.write("w.bin", payload)
    chunks = ModelChunks(size=chunk, digests=chunk_digests(payload, chunk))
    file = ModelFile(
        path="w.bin", size=SIZE, digest=digest(payload), urls=("w.bin",), chunks=chunks
    )
    model = ModelSpec(name="c", version="v1", files=(file,))
    bad = bytearray(payload)
    bad[3 * chunk] ^= 1
    file_server.faults.set("w.bin", body=bytes(bad), times=2)  # two bad answers, then good
    store = ModelStore(NodePaths(tmp_path / "state"))

    store.ensure([model], client=client, base_url=file_server.url, limits=LIMITS)

    assert (store.tree_path(model) / "w.bin").read_bytes() == payload


def test_bytes_and_errors_per_mirror_add_up_over_fetches_and_reach_the_metrics(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    mirror_tally().take()  # what earlier tests in this process counted is not this node's
    other = payload[::-1]
    for name, data in (("one.bin", payload), ("two.bin", other)):
        file_server.write(f"bad/{name}", data)
        file_server.faults.set(f"bad/{name}", status=503)
    state = tmp_path / "state"
    store = ModelStore(NodePaths(state))
    with FileServer(tmp_path / "good") as good:
        models = []
        for name, data in (("one.bin", payload), ("two.bin", other)):
            good.write(name, data)
            urls = (file_server.url_for(f"bad/{name}"), good.url_for(name))
            file = ModelFile(path=name, size=len(data), digest=digest(data), urls=urls)
            models.append(ModelSpec(name=name.removesuffix(".bin"), version="v1", files=(file,)))
        for model in models:  # two fetches, two processes' worth of figures
            store.ensure([model], client=client, base_url=None, limits=LIMITS)
        good_host = mirror_host(good.url)

    totals = read_mirror_totals(state / "models" / ".mirrors.json")
    assert totals.received[good_host] >= 2 * SIZE
    assert totals.errors[mirror_host(file_server.url)] >= 2  # at least one per fetch
    assert totals.received.get(mirror_host(file_server.url), 0) == 0
    node = Node(Settings(network="demo", state_dir=str(state)))
    shown = {(m.name, m.labels): m.value for m in node_metrics(node, last_apply_s=None)}
    assert shown[("reconciler_mirror_bytes_total", (("mirror", good_host),))] >= 2 * SIZE
    bad_errors = ("reconciler_mirror_errors_total", (("mirror", mirror_host(file_server.url)),))
    assert shown[bad_errors] == totals.errors[mirror_host(file_server.url)]


# ---------------------------------------------------------------------- resume


def test_mirror_gone_at_half_then_the_next_pass_is_sent_only_what_was_missing(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(24 * MIB + 4321)
    file_server.write("w.bin", data)
    file = ModelFile(path="w.bin", size=len(data), digest=digest(data), urls=("w.bin",))
    model = ModelSpec(name="gone", version="v1", files=(file,))
    # A stall bound long enough that a busy host does not make a segment look slow.
    limits = replace(LIMITS, piece_bytes=4 * MIB, connections_per_file=8, stall_s=3.0)
    state = tmp_path / "state"
    partial = state / "work" / "models" / "partial" / file.digest.removeprefix("sha256:")

    # The mirror refuses every new request once half the file is out; requests running
    # then finish, the pass fails and keeps its partial and record.
    def go_away() -> None:
        while file_server.stats.body_bytes("w.bin") < len(data) // 2:
            time.sleep(0.001)
        file_server.faults.set("w.bin", status=503)

    watcher = threading.Thread(target=go_away, daemon=True)
    watcher.start()
    store = ModelStore(NodePaths(state))
    with pytest.raises(DownloadError):
        store.ensure([model], client=client, base_url=file_server.url, limits=limits)
    watcher.join()
    record = PartsRecord.load(record_path(partial))
    assert record is not None
    missing = len(data) - sum(e - s for s, e in record.written)
    assert 0 < missing < len(data)
    file_server.faults.clear("w.bin")
    file_server.stats.reset()

    store.ensure([model], client=client, base_url=file_server.url, limits=limits)

    assert (store.tree_path(model) / "w.bin").read_bytes() == data
    index = json.loads((state / "models" / ".index.json").read_text())
    assert file.digest.removeprefix("sha256:") in index["blobs"]
    # No range was split while running (a cut connection throws away what the mirror had
    # already pushed into it): what was sent is what was missing, within 1 %.
    assert file_server.stats.body_bytes("w.bin") <= missing * 1.01


_CHILD = """
import sys, time
from pathlib import Path
from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.core.paths import NodePaths
from reconciler.models.download import new_client
from reconciler.models.limits import DownloadLimits
from reconciler.models.store import ModelStore
state, base, size, digest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
file = ModelFile(path="big.bin", size=size, digest=digest, urls=("big.bin",))
limits = DownloadLimits(min_split_bytes=256 * 1024, piece_bytes=1024 * 1024, stall_s=2.0)
with new_client() as client:
    ModelStore(NodePaths(Path(state))).ensure(
        [ModelSpec(name="big", version="v1", files=(file,))],
        client=client, base_url=base, limits=limits,
    )
"""


def _child(state: Path, base: str, data: bytes) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state), base, str(len(data)), digest(data)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sigkill_mid_download_then_resume_resends_nothing_recorded(
    payload: bytes, tmp_path: Path
) -> None:
    (tmp_path / "slow").mkdir()
    # Slow enough (8 connections x 256 KiB/s: about 3 s) to be killed halfway on a busy host.
    nginx = start_nginx(tmp_path / "slow", tmp_path / "nginx", limit_rate="256k", log_bytes=True)
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/setup installs nginx-light)")
    try:
        _kill_then_resume(nginx, payload, tmp_path)
    finally:
        nginx.close()


def _kill_then_resume(nginx: NginxOrigin, payload: bytes, tmp_path: Path) -> None:
    (nginx.root / "big.bin").write_bytes(payload)
    state = tmp_path / "state"
    hex_ = digest(payload).removeprefix("sha256:")
    partial = state / "work" / "models" / "partial" / hex_
    child = _child(state, nginx.url, payload)
    recorded = 0
    deadline = time.monotonic() + 20
    while child.poll() is None and time.monotonic() < deadline:
        record = PartsRecord.load(record_path(partial))
        if record is not None:
            recorded = sum(e - s for s, e in record.written)
            if recorded >= SIZE // 2:
                os.kill(child.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the download ended before it was killed"
    record = PartsRecord.load(record_path(partial))
    assert record is not None
    kept = sum(e - s for s, e in record.written)
    assert kept >= SIZE // 2
    time.sleep(0.3)  # nginx logs the killed requests once it notices
    nginx.reset_log()

    resumed = _child(state, nginx.url, payload)
    assert resumed.wait(timeout=60) == 0

    blob = state / "models" / "blobs" / "sha256" / hex_
    assert blob.read_bytes() == payload
    index = json.loads((state / "models" / ".index.json").read_text())
    assert hex_ in index["blobs"]
    assert not partial.exists() and not record_path(partial).exists()
    # The second run asked only for what the record did not hold (splits of tails aside).
    assert nginx.body_bytes_sent() <= (SIZE - kept) + 1 * MIB
    assert all(asked.startswith("bytes=") for _s, _b, asked in nginx.requests())


# ----------------------------------------------------------------- publish --chunks


def _reconcile(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_publish_chunks_fills_digests_a_node_then_verifies_chunk_by_chunk(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    chunk = 1 * MIB
    small = b"{}"
    snapshot = base_snapshot()
    big_entry = {"path": "w/big.bin", "size": SIZE, "digest": digest(payload), "urls": ["x"]}
    small_entry = {"path": "config.json", "size": 2, "digest": digest(small), "urls": ["y"]}
    lost = {"path": "lost.bin", "size": SIZE, "digest": digest(b"0" * SIZE), "urls": ["z"]}
    snapshot["models"][0]["files"] = [big_entry, small_entry, lost]
    folder = tmp_path / "files"
    (folder / "tiny-llm" / "v1" / "w").mkdir(parents=True)
    (folder / "tiny-llm" / "v1" / "w" / "big.bin").write_bytes(payload)
    (folder / "config.json").write_bytes(small)
    (tmp_path / "snapshot.json").write_text(json.dumps(snapshot), encoding="utf-8")
    assert _reconcile("keygen", str(tmp_path / "k1")).exit_code == 0
    origin = tmp_path / "origin"
    publish = ("publish", "--origin", str(origin), "--key", str(tmp_path / "k1.key"))

    result = _reconcile(
        *publish, "--chunks", str(folder), "--chunk-size", "1M", str(tmp_path / "snapshot.json")
    )

    assert result.exit_code == 0, result.stderr
    assert "chunks: 1 model file(s) given chunk digests, 1 not found" in result.stdout
    head = json.loads(base64.b64decode(json.loads((origin / "head.json").read_bytes())["payload"]))
    signed = origin / "snapshots" / f"{head['config_digest'].removeprefix('sha256:')}.json"
    document = json.loads(base64.b64decode(json.loads(signed.read_bytes())["payload"]))
    files = Snapshot.from_payload(document).models[0].files
    assert files[0].chunks == ModelChunks(size=chunk, digests=chunk_digests(payload, chunk))
    assert files[1].chunks is None and files[2].chunks is None  # one chunk or less; not found

    # A node given those chunks re-fetches only the chunk a mirror got wrong.
    file_server.write("w.bin", payload)
    bad = bytearray(payload)
    bad[2 * chunk + 5] ^= 1
    file_server.faults.set("w.bin", body=bytes(bad), times=1)
    model = ModelSpec(name="c", version="v1", files=(replace(files[0], urls=("w.bin",)),))
    store = ModelStore(NodePaths(tmp_path / "state"))
    store.ensure([model], client=client, base_url=file_server.url, limits=LIMITS)
    assert (store.tree_path(model) / "w/big.bin").read_bytes() == payload
    assert file_server.stats.body_bytes("w.bin") <= SIZE + 2 * MIB


def test_publish_chunks_refuses_a_file_that_does_not_match_its_digest(tmp_path: Path) -> None:
    snapshot = base_snapshot()
    entry = snapshot["models"][0]["files"][0]
    entry.update(size=3 * MIB, digest=digest(b"a" * 3 * MIB))
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / entry["path"]).write_bytes(b"b" * 3 * MIB)

    with pytest.raises(SettingsError, match="does not match the digest"):
        with_chunks(snapshot, folder, chunk_bytes=MIB)
    assert "chunks" not in entry  # the caller's document is left as it was
