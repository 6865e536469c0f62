"""The model store on a real filesystem, fed by a real HTTP server on 127.0.0.1.

Scenarios read like an operator's day: a model arrives, a second model shares a file, the
disk fills up, a mirror serves the wrong bytes, someone touches a blob, verify finds rot.
The server's counters say what was downloaded; the store's ``files_hashed`` says what was
read back from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.core.errors import DiskSpaceError, DownloadError, HashMismatchError
from reconciler.core.paths import NodePaths
from reconciler.models.download import new_client
from reconciler.models.index import Index
from reconciler.models.progress import ProgressReporter
from reconciler.models.store import (
    INDEX_NAME,
    BlobsMissingError,
    ModelLayoutError,
    ModelState,
    ModelStatus,
    ModelStore,
)
from tests.support.fileserver import FileServer

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def publish(
    server: FileServer, name: str, version: str, files: dict[str, bytes], *, folder: str = "files"
) -> ModelSpec:
    """Serve each file under ``<folder>/<hex>`` and return the model as a snapshot lists it,
    with mirror URLs relative to the origin (the server's root)."""
    entries = []
    for path, data in files.items():
        served = f"{folder}/{hashlib.sha256(data).hexdigest()}"
        server.write(served, data)
        entries.append(ModelFile(path=path, size=len(data), digest=sha(data), urls=(served,)))
    return ModelSpec(name=name, version=version, files=tuple(entries))


def served_path(data: bytes, folder: str = "files") -> str:
    return f"{folder}/{hashlib.sha256(data).hexdigest()}"


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with new_client(read_timeout_s=5.0) as c:
        yield c


@pytest.fixture
def paths(tmp_path: Path) -> NodePaths:
    return NodePaths(tmp_path / "state")


@pytest.fixture
def store(paths: NodePaths) -> ModelStore:
    return ModelStore(paths)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, so that "disk full" is real and fast."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def state_of(store: ModelStore, models: list[ModelSpec]) -> dict[str, ModelStatus]:
    return {s.model_id: s for s in store.states(models)}


# -------------------------------------------------------------------- install


def test_installs_model_as_hard_links_to_verified_blobs(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    weights, config = os.urandom(2 * MiB + 3), b'{"layers": 32}'
    model = publish(file_server, "mistral", "v1", {"w/model.bin": weights, "config.json": config})

    report = store.ensure([model], client=client, base_url=file_server.url)

    tree = paths.models / "mistral" / "v1"
    assert report.changed == ("mistral:v1",)
    assert (tree / "w" / "model.bin").read_bytes() == weights
    assert (tree / "config.json").read_bytes() == config
    blob = paths.models / "blobs" / "sha256" / hashlib.sha256(weights).hexdigest()
    assert (tree / "w" / "model.bin").stat().st_ino == blob.stat().st_ino
    assert blob.stat().st_mode & 0o777 == 0o444
    assert state_of(store, [model])["mistral:v1"].state is ModelState.ACTIVE
    assert not any((paths.work / "models" / "partial").iterdir())
    assert not any((paths.work / "models" / "trees").iterdir())


def test_file_shared_by_two_models_is_fetched_and_stored_once(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    shared = os.urandom(MiB)
    one = publish(file_server, "llama", "v1", {"tokenizer.json": shared, "a.bin": b"a" * 10})
    two = publish(file_server, "llama", "v2", {"tok/tokenizer.json": shared, "b.bin": b"b" * 10})

    store.ensure([one, two], client=client, base_url=file_server.url, concurrency=4)

    assert file_server.stats.requests(served_path(shared)) == 1
    assert file_server.stats.body_bytes(served_path(shared)) == len(shared)
    first = (paths.models / "llama" / "v1" / "tokenizer.json").stat()
    second = (paths.models / "llama" / "v2" / "tok" / "tokenizer.json").stat()
    assert first.st_ino == second.st_ino
    assert first.st_nlink == 3  # the blob and two trees
    assert [f.digest for f in store.missing_blobs([one, two])] == []


def test_missing_blobs_are_deduplicated_and_counted_once(
    file_server: FileServer, store: ModelStore
) -> None:
    shared = os.urandom(1000)
    one = publish(file_server, "m", "v1", {"x": shared, "y": b"y"})
    two = publish(file_server, "m", "v2", {"z": shared})

    missing = store.missing_blobs([one, two])

    assert [f.digest for f in missing] == [sha(shared), sha(b"y")]
    assert store.bytes_needed([one, two]) == 1001
    assert file_server.stats.total_requests() == 0


def test_relative_mirror_urls_resolve_against_the_origin(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    data = os.urandom(5000)
    file_server.write("mirror/weights.bin", data)
    model = ModelSpec(
        name="m",
        version="v1",
        files=(ModelFile("w.bin", len(data), sha(data), ("../mirror/weights.bin",)),),
    )

    store.ensure([model], client=client, base_url=file_server.url_for("config/"))

    assert file_server.stats.requests("mirror/weights.bin") == 1
    assert store.is_installed(model)


def test_installs_from_a_file_url_mirror(
    client: httpx.Client, store: ModelStore, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    source = tmp_path / "usb-stick" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(data)
    model = ModelSpec("m", "v1", (ModelFile("w.bin", len(data), sha(data), (source.as_uri(),)),))

    store.ensure([model], client=client, base_url=None)

    assert store.is_installed(model)


def test_first_mirror_down_second_mirror_serves(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    data = os.urandom(10_000)
    file_server.write("b/w.bin", data)
    file_server.faults.set("a/w.bin", status=500)
    model = ModelSpec(
        "m", "v1", (ModelFile("w.bin", len(data), sha(data), ("a/w.bin", "b/w.bin")),)
    )

    store.ensure([model], client=client, base_url=file_server.url)

    assert file_server.stats.statuses("a/w.bin") == [500]
    assert store.is_installed(model)


def test_reserved_or_unsafe_names_are_refused_before_anything_happens(
    store: ModelStore, client: httpx.Client, paths: NodePaths
) -> None:
    blobs = ModelSpec("blobs", "sha256", (ModelFile("x", 1, sha(b"x"), ("x",)),))
    escape = ModelSpec("m", "v1", (ModelFile("../../etc/passwd", 1, sha(b"x"), ("x",)),))

    for model in (blobs, escape):
        with pytest.raises(ModelLayoutError):
            store.ensure([model], client=client, base_url="http://127.0.0.1:1/")

    assert not paths.models.exists()


def test_install_refuses_a_model_whose_blobs_are_not_fetched(store: ModelStore) -> None:
    model = ModelSpec("m", "v1", (ModelFile("x", 1, sha(b"x"), ("x",)),))
    with pytest.raises(BlobsMissingError, match="1 file"):
        store.install(model)


def test_conflicting_paths_in_one_model_are_a_layout_error(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    model = publish(file_server, "m", "v1", {"a": b"file", "a/b": b"nested"})

    with pytest.raises(ModelLayoutError, match="conflicts"):
        store.ensure([model], client=client, base_url=file_server.url)

    assert not (paths.models / "m" / "v1").exists()


# -------------------------------------------------------------- cheap no-op


def test_converged_ensure_opens_no_blob_and_asks_no_server(
    file_server: FileServer, client: httpx.Client, paths: NodePaths
) -> None:
    model = publish(file_server, "m", "v1", {"a.bin": os.urandom(MiB), "b.txt": b"hello"})
    ModelStore(paths).ensure([model], client=client, base_url=file_server.url)
    requests = file_server.stats.total_requests()

    # A new store, as after a restart: it must trust the index, not re-read the blobs.
    again = ModelStore(paths)
    report = again.ensure([model], client=client, base_url=file_server.url)

    assert report.changed == ()
    assert again.files_hashed == 0
    assert again.bytes_hashed == 0
    assert file_server.stats.total_requests() == requests
    assert again.is_installed(model)
    assert again.files_hashed == 0


class OpenedFiles:
    """Every path opened by this process while recording (a sys.audit hook; hooks cannot be
    removed, so one is installed once and switched on and off)."""

    recording: list[str] | None = None
    installed = False

    @classmethod
    def record(cls) -> list[str]:
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True
        cls.recording = []
        return cls.recording

    @classmethod
    def stop(cls) -> None:
        cls.recording = None

    @classmethod
    def _hook(cls, event: str, args: tuple[object, ...]) -> None:
        if event == "open" and cls.recording is not None and args:
            cls.recording.append(str(args[0]))


def test_converged_check_opens_no_model_file_at_all(
    file_server: FileServer, client: httpx.Client, paths: NodePaths
) -> None:
    models = [
        publish(file_server, "m", f"v{i}", {f"f{j}.bin": os.urandom(100 + j) for j in range(5)})
        for i in range(3)
    ]
    ModelStore(paths).ensure(models, client=client, base_url=file_server.url)

    opened = OpenedFiles.record()
    try:
        store = ModelStore(paths)
        store.ensure(models, client=client, base_url=file_server.url)
        states = store.states(models)
    finally:
        OpenedFiles.stop()

    assert {s.state for s in states} == {ModelState.ACTIVE}
    assert [p for p in opened if str(paths.models) in p] == [str(paths.models / INDEX_NAME)]


def test_stat_change_makes_the_store_hash_the_file_again(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    data = os.urandom(MiB)
    model = publish(file_server, "m", "v1", {"a.bin": data})
    store.ensure([model], client=client, base_url=file_server.url)
    tree_file = paths.models / "m" / "v1" / "a.bin"
    os.utime(tree_file, ns=(1, 1))  # same inode as the blob: the blob's stat moves too

    assert not store.is_installed(model)
    report = store.ensure([model], client=client, base_url=file_server.url)

    assert store.files_hashed == 1
    assert report.changed == ()  # verified again, nothing to rebuild
    assert store.is_installed(model)
    assert file_server.stats.requests(served_path(data)) == 1


def test_blob_changed_in_place_is_found_deleted_and_fetched_again(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    data = os.urandom(MiB)
    model = publish(file_server, "m", "v1", {"a.bin": data})
    store.ensure([model], client=client, base_url=file_server.url)
    tree_file = paths.models / "m" / "v1" / "a.bin"
    with tree_file.open("r+b") as handle:  # root ignores the 0444 mode, as a bug would
        handle.write(b"\0" * 16)

    store.ensure([model], client=client, base_url=file_server.url)

    assert tree_file.read_bytes() == data
    assert file_server.stats.requests(served_path(data)) == 2
    assert store.is_installed(model)


def test_unreadable_index_means_hash_again_never_trust(
    file_server: FileServer, client: httpx.Client, paths: NodePaths
) -> None:
    model = publish(file_server, "m", "v1", {"a": os.urandom(1000), "b": os.urandom(1000)})
    ModelStore(paths).ensure([model], client=client, base_url=file_server.url)
    (paths.models / INDEX_NAME).write_text("{not json")

    fresh = ModelStore(paths)
    fresh.ensure([model], client=client, base_url=file_server.url)

    assert fresh.files_hashed == 2
    assert fresh.is_installed(model)
    assert json.loads((paths.models / INDEX_NAME).read_text())["format"] == 1


def test_index_records_each_verified_blob(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    data = b"weights"
    model = publish(file_server, "m", "v1", {"w": data})
    store.ensure([model], client=client, base_url=file_server.url)

    index = json.loads((paths.models / INDEX_NAME).read_text())
    blob = (paths.models / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()).stat()

    record = index["blobs"][hashlib.sha256(data).hexdigest()]
    assert (record["size"], record["mtime_ns"], record["inode"]) == (
        blob.st_size,
        blob.st_mtime_ns,
        blob.st_ino,
    )
    assert index["models"]["m:v1"]["files"] == {"w": sha(data)}
    assert not list(paths.models.glob(f".{INDEX_NAME}.*"))  # no temp files left behind


def test_many_blobs_cost_a_few_index_saves_and_are_all_on_disk_when_fetch_returns(
    file_server: FileServer,
    client: httpx.Client,
    store: ModelStore,
    paths: NodePaths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {f"part-{i:03d}": f"part {i}\n".encode() for i in range(60)}
    model = publish(file_server, "many", "v1", files)
    saves: list[int] = []
    original = Index.save

    def counted(self: Index) -> None:
        saves.append(len(self.contents().blobs))
        original(self)

    monkeypatch.setattr(Index, "save", counted)
    fetched = store.fetch_blobs([model], client=client, base_url=file_server.url)

    assert len(fetched) == 60
    # Not one save per blob (which made large installs quadratic): one per second at most,
    # and the last one holds every blob.
    assert 1 <= len(saves) <= 5, saves
    assert saves[-1] == 60
    index = json.loads((paths.models / INDEX_NAME).read_text())
    assert len(index["blobs"]) == 60
    fresh = ModelStore(paths)  # the next process trusts them all without reading a byte
    assert fresh.missing_blobs([model]) == []
    assert fresh.files_hashed == 0


# ----------------------------------------------------------------- repair


def test_verify_all_finds_a_corrupted_blob_and_the_next_ensure_repairs_it(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    data = os.urandom(MiB)
    model = publish(file_server, "m", "v1", {"a.bin": data, "b.bin": b"fine"})
    store.ensure([model], client=client, base_url=file_server.url)
    blob = paths.models / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    before = blob.stat()
    with blob.open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"rot")
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))  # silent rot: stat unchanged
    assert store.is_installed(model)  # the cheap check cannot see it; verify can

    bad = store.verify_all()

    assert {b.path for b in bad} == {blob, paths.models / "m" / "v1" / "a.bin"}
    assert all("digest mismatch" in b.reason and b.repaired for b in bad)
    assert not blob.exists()
    assert state_of(store, [model])["m:v1"].state is ModelState.PENDING

    store.ensure([model], client=client, base_url=file_server.url)

    assert (paths.models / "m" / "v1" / "a.bin").read_bytes() == data
    assert file_server.stats.requests(served_path(data)) == 2
    assert store.verify_all() == []


def test_verify_all_without_repair_only_reports(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    model = publish(file_server, "m", "v1", {"a.bin": b"original"})
    store.ensure([model], client=client, base_url=file_server.url)
    (paths.models / "m" / "v1" / "a.bin").write_bytes(b"tampered")

    bad = store.verify_all(repair=False)

    assert bad and not any(b.repaired for b in bad)
    assert (paths.models / "m" / "v1" / "a.bin").exists()
    assert "digest mismatch" in bad[0].one_line()


def test_verify_all_reports_and_removes_files_that_are_not_part_of_the_model(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    model = publish(file_server, "m", "v1", {"a.bin": b"weights"})
    store.ensure([model], client=client, base_url=file_server.url)
    stray = paths.models / "m" / "v1" / "more" / "shard-2.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"not in the snapshot")

    bad = store.verify_all()

    assert [(b.path, b.reason) for b in bad] == [(stray, "not part of the model")]
    assert not stray.exists()
    assert store.is_installed(model)


def test_tree_repair_relinks_foreign_files_and_removes_extras(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    data = os.urandom(4096)
    model = publish(file_server, "m", "v1", {"sub/a.bin": data, "b.bin": b"b"})
    store.ensure([model], client=client, base_url=file_server.url)
    tree = paths.models / "m" / "v1"
    tree_dir_inode = tree.stat().st_ino
    copy = tree / "sub" / "a.bin"
    copy.unlink()
    copy.write_bytes(data)  # right bytes, but not the blob: a copy someone made
    (tree / "extra.safetensors").write_bytes(b"a runtime would load this")
    (tree / "link").symlink_to("/etc")

    assert not store.is_installed(model)
    report = store.ensure([model], client=client, base_url=file_server.url)

    blob = paths.models / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    assert report.changed == ("m:v1",)
    assert copy.stat().st_ino == blob.stat().st_ino
    assert sorted(p.name for p in tree.iterdir()) == ["b.bin", "sub"]
    assert tree.stat().st_ino == tree_dir_inode  # repaired in place: mounts keep seeing it
    assert file_server.stats.requests(served_path(data)) == 1


# ---------------------------------------------------------------- failures


def test_wrong_bytes_install_nothing_and_mark_the_model_failed(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    good = os.urandom(100_000)
    model = publish(file_server, "m", "v1", {"w.bin": good, "c.json": b"{}"})
    file_server.faults.set(served_path(good), body=os.urandom(len(good)))

    with pytest.raises(HashMismatchError) as caught:
        store.ensure([model], client=client, base_url=file_server.url)

    line = caught.value.one_line()
    assert "m:v1/w.bin" in line and "digest mismatch" in line
    assert not (paths.models / "m").exists()
    assert not (paths.models / "blobs" / "sha256" / hashlib.sha256(good).hexdigest()).exists()
    assert not any((paths.work / "models" / "partial").iterdir())
    status = state_of(ModelStore(paths), [model])["m:v1"]  # persisted across restarts
    assert status.state is ModelState.FAILED
    assert status.reason is not None and "w.bin" in status.reason

    file_server.faults.clear()
    store.ensure([model], client=client, base_url=file_server.url)
    assert state_of(store, [model])["m:v1"] == ModelStatus("m:v1", ModelState.ACTIVE)


def test_unreachable_mirror_leaves_the_model_pending_with_a_reason(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    model = ModelSpec("m", "v1", (ModelFile("w", 5, sha(b"hello"), ("gone/w",)),))

    with pytest.raises(DownloadError) as caught:
        store.ensure([model], client=client, base_url=file_server.url)

    assert not isinstance(caught.value, HashMismatchError)
    status = state_of(store, [model])["m:v1"]
    assert status.state is ModelState.PENDING
    assert status.reason is not None and "HTTP 404" in status.reason


def test_complete_models_are_installed_even_when_another_fails(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    fine = publish(file_server, "fine", "v1", {"w": b"ok"})
    broken = ModelSpec("broken", "v1", (ModelFile("w", 3, sha(b"abc"), ("missing",)),))

    with pytest.raises(DownloadError, match="broken:v1/w"):
        store.ensure([fine, broken], client=client, base_url=file_server.url)

    states = state_of(store, [fine, broken])
    assert states["fine:v1"].state is ModelState.ACTIVE
    assert states["broken:v1"].state is ModelState.PENDING


# ------------------------------------------------------------------- disk


def test_not_enough_space_fails_with_one_line_before_anything_changes(
    file_server: FileServer, client: httpx.Client, small_disk: Path
) -> None:
    paths = NodePaths(small_disk / "state")
    model = publish(
        file_server, "big", "v1", {"a.bin": os.urandom(6 * MiB), "b.bin": os.urandom(3 * MiB)}
    )
    store = ModelStore(paths)

    with pytest.raises(DiskSpaceError) as caught:
        store.ensure([model], client=client, base_url=file_server.url)

    line = caught.value.one_line()
    assert line == str(caught.value)
    assert line.startswith("not enough disk space for model files: 9.0 MiB to download")
    assert not paths.state_dir.exists()  # nothing created, nothing downloaded
    assert file_server.stats.total_requests() == 0


def test_reserve_counts_against_free_space(
    file_server: FileServer, client: httpx.Client, small_disk: Path
) -> None:
    paths = NodePaths(small_disk / "state")
    model = publish(file_server, "m", "v1", {"a.bin": os.urandom(MiB)})
    store = ModelStore(paths)

    with pytest.raises(DiskSpaceError, match="reserve"):
        store.ensure([model], client=client, base_url=file_server.url, reserve_bytes=7 * MiB + 1)
    store.ensure([model], client=client, base_url=file_server.url, reserve_bytes=MiB)

    assert store.is_installed(model)


class DiskEater(ProgressReporter):
    """Fills the disk the moment the first bytes of a download arrive: another process
    writing logs, a container spilling to disk."""

    def __init__(self, victim: Path) -> None:
        super().__init__(stream=io.StringIO(), interactive=False)
        self.victim = victim
        self.ate = False

    def file_started(self, name: str, size: int) -> Callable[[int], None]:
        advance = super().file_started(name, size)

        def eat_then_advance(delta: int) -> None:
            if delta > 0 and not self.ate:
                self.ate = True
                with self.victim.open("wb") as hog:
                    try:
                        while True:
                            hog.write(b"\0" * MiB)
                            hog.flush()
                    except OSError:
                        pass
            advance(delta)

        return eat_then_advance


def test_disk_filling_up_during_download_is_a_clear_error_with_nothing_half_written(
    file_server: FileServer, client: httpx.Client, small_disk: Path
) -> None:
    paths = NodePaths(small_disk / "state")
    data = os.urandom(5 * MiB)
    model = publish(file_server, "m", "v1", {"a.bin": data})
    store = ModelStore(paths)
    eater = DiskEater(small_disk / "hog")

    with pytest.raises(DiskSpaceError) as caught:
        store.ensure([model], client=client, base_url=file_server.url, progress_reporter=eater)

    assert eater.ate
    assert (
        caught.value.one_line()
        == f"disk full while downloading m:v1/a.bin into {paths.work / 'models' / 'partial'}"
    )
    assert list((paths.models / "blobs" / "sha256").iterdir()) == []
    assert not (paths.models / "m").exists()
    assert list((paths.work / "models" / "partial").iterdir()) == []  # space given back

    (small_disk / "hog").unlink()
    store.ensure([model], client=client, base_url=file_server.url)
    assert store.is_installed(model)


def test_disk_full_while_saving_the_index_is_one_line_and_keeps_the_old_index(
    file_server: FileServer, client: httpx.Client, small_disk: Path
) -> None:
    paths = NodePaths(small_disk / "state")
    model = publish(file_server, "m", "v1", {"a.bin": b"weights"})
    ModelStore(paths).ensure([model], client=client, base_url=file_server.url)
    before = (paths.models / INDEX_NAME).read_bytes()
    with (small_disk / "hog").open("wb", buffering=0) as hog, contextlib.suppress(OSError):
        while True:
            hog.write(b"\0" * 4096)

    with pytest.raises(DiskSpaceError) as caught:
        ModelStore(paths).remove("m:v1")  # forgets the model: the index is rewritten

    assert caught.value.one_line() == f"disk full while writing {paths.models / INDEX_NAME}"
    assert (paths.models / INDEX_NAME).read_bytes() == before


def test_check_space_changes_nothing(store: ModelStore, paths: NodePaths) -> None:
    store.check_space(0, 0)
    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        store.check_space(2**62, 0)
    assert not paths.state_dir.exists()


# ------------------------------------------------------------- remove and gc


def test_gc_keeps_kept_and_linked_blobs_and_removes_the_rest(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    shared, only_old, kept, current = (os.urandom(1000 + i) for i in range(4))
    old = publish(file_server, "m", "v1", {"s": shared, "o": only_old, "k": kept})
    new = publish(file_server, "m", "v2", {"s": shared, "c": current})
    store.ensure([old, new], client=client, base_url=file_server.url)
    (paths.work / "models" / "partial" / ("f" * 64)).write_bytes(b"stale partial")

    assert store.remove("m:v1")
    report = store.gc(keep={sha(kept)})

    blobs = {p.name for p in (paths.models / "blobs" / "sha256").iterdir()}
    assert blobs == {hashlib.sha256(d).hexdigest() for d in (shared, kept, current)}
    assert report.removed_blobs == 1
    assert report.freed_bytes == len(only_old)
    assert list((paths.work / "models" / "partial").iterdir()) == []
    assert store.is_installed(new)
    assert {s.model_id for s in store.states([new])} == {"m:v2"}


def test_remove_makes_the_tree_disappear_and_the_model_inactive_no_more(
    file_server: FileServer, client: httpx.Client, store: ModelStore, paths: NodePaths
) -> None:
    one = publish(file_server, "a", "v1", {"w": b"1"})
    two = publish(file_server, "b", "v1", {"w": b"2"})
    store.ensure([one, two], client=client, base_url=file_server.url)

    states = state_of(store, [two])
    assert states["a:v1"].state is ModelState.INACTIVE  # installed, not in this snapshot
    assert [m.model_id for m in store.installed_models()] == ["a:v1", "b:v1"]

    assert store.remove("a:v1")
    assert not store.remove("a:v1")
    assert not (paths.models / "a").exists()
    assert "a:v1" not in state_of(store, [two])


# ----------------------------------------------------------------- offline


def test_offline_ensure_installs_what_it_can_and_reports_the_rest(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    have = publish(file_server, "have", "v1", {"w": b"on disk"})
    store.ensure([have], client=client, base_url=file_server.url)
    store.remove("have:v1")
    lacking = publish(file_server, "lack", "v1", {"w": b"never fetched", "x": b"on disk"})
    requests = file_server.stats.total_requests()

    report = store.ensure([have, lacking], client=None, base_url=file_server.url)

    assert report.changed == ("have:v1",)
    assert [f.digest for f in report.missing] == [sha(b"never fetched")]
    assert file_server.stats.total_requests() == requests


# ---------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_one_line_on_a_terminal(
    file_server: FileServer, client: httpx.Client, store: ModelStore
) -> None:
    model = publish(file_server, "m", "v1", {"a.bin": os.urandom(3 * MiB), "b": b"small"})
    screen = Terminal()

    store.ensure(
        [model],
        client=client,
        base_url=file_server.url,
        progress_reporter=ProgressReporter(stream=screen, redraw_interval_s=0),
    )

    output = screen.getvalue()
    assert output.count("\n") == 1 and output.endswith("\n")
    last = output.rstrip("\n").split("\r")[-1]
    assert "models 2/2" in last and "100%" in last and "3.0 MiB/3.0 MiB" in last


def test_progress_is_logged_in_lines_without_a_terminal(
    file_server: FileServer,
    client: httpx.Client,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = publish(file_server, "m", "v1", {"a.bin": os.urandom(2 * MiB)})
    caplog.set_level(logging.INFO, logger="reconciler.progress")

    store.ensure(
        [model],
        client=client,
        base_url=file_server.url,
        progress_reporter=ProgressReporter(stream=io.StringIO()),
    )

    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "fetching 1 model file(s), 2.0 MiB"
    assert any(m.startswith("models: ") and "(100%)" in m for m in messages)
    assert any(m.startswith("fetched m:v1/a.bin (2.0 MiB)") for m in messages)


def test_progress_reporter_logs_every_interval_with_a_fake_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    reporter = ProgressReporter(
        stream=io.StringIO(), log_interval_s=5.0, log_step=1.0, clock=lambda: now[0]
    )
    caplog.set_level(logging.INFO, logger="reconciler.progress")
    reporter.start(total_bytes=1000, total_files=1)
    advance = reporter.file_started("f", 1000)
    for _ in range(10):
        now[0] += 1.0
        advance(10)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("models:")]
    assert lines == [
        "models: 50 B of 1000 B (5%) at 10 B/s, ETA 1m35s, 0 connection(s), 0 of 1 file(s) done",
        "models: 100 B of 1000 B (10%) at 10 B/s, ETA 1m30s, 0 connection(s), 0 of 1 file(s) done",
    ]


# ----------------------------------------------------------------- properties


CONTENTS = [os.urandom(n) for n in (0, 1, 700, 65_536, 200_001)]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    layout=st.lists(
        st.dictionaries(
            st.sampled_from(["a", "b/c", "d/e/f", "g.bin"]),
            st.sampled_from(range(len(CONTENTS))),
            min_size=1,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_set_of_models_installs_exactly_and_downloads_each_digest_once(
    file_server: FileServer, client: httpx.Client, layout: list[dict[str, int]]
) -> None:
    file_server.stats.reset()
    with tempfile.TemporaryDirectory() as scratch:
        store = ModelStore(NodePaths(Path(scratch)))
        models = [
            publish(file_server, "m", f"v{i}", {p: CONTENTS[c] for p, c in files.items()})
            for i, files in enumerate(layout)
        ]

        store.ensure(models, client=client, base_url=file_server.url, concurrency=3)

        for model, files in zip(models, layout, strict=True):
            tree = store.tree_path(model)
            for path, content in files.items():
                assert (tree / path).read_bytes() == CONTENTS[content]
            assert store.is_installed(model)
        used = {c for files in layout for c in files.values()}
        for content in used:
            if CONTENTS[content]:
                assert file_server.stats.requests(served_path(CONTENTS[content])) == 1
        assert store.files_hashed == 0
