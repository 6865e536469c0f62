"""Faults around a running node: each gives one clear line, keeps the last known configuration
running, loses nothing, and heals by itself once the fault is gone.

Every scenario starts from a node converged on snapshot 1 (one model, one runtime
container), publishes snapshot 2, injects the fault, runs ``reconcile once``, and checks:

* the failure is reported in one line that names the cause (and ``status`` shows it);
* the containers of snapshot 1 still run, not restarted; HEAD and the trees are unchanged
  unless the new snapshot was already applied; git, receipts and the model files are sound;
* with the fault gone and nothing else done, the next ``once`` converges on snapshot 2 and
  ``invariants.converged_problems`` finds nothing.

A fault that needs a service to vanish uses a private one (``services``), never the
session's. Related cases tested elsewhere:

* Podman down before a pass: tests/test_apply.py,
  ``test_podman_down_quarantines_nothing_and_the_next_pass_converges``;
* settings made bad while ``watch`` runs: tests/test_watch.py,
  ``test_sighup_polls_now_and_rereads_settings_keeping_the_old_ones_if_bad``;
* each origin fault on its own: tests/test_intake.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.models.download import download_file, new_client
from tests.reliability.agent import AgentCommand, Finished, agent_env
from tests.reliability.invariants import converged_problems
from tests.reliability.services import PrivatePodman, PrivateRegistry
from tests.support.fileserver import Fault, FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import Release, RepositorySimulator, base_snapshot

pytestmark = [pytest.mark.podman]

Reported = Outcome | Finished


def served_model(server: FileServer, name: str, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    server.write(f"models/{digest}", data)
    return {
        "name": name,
        "version": "v1",
        "files": [
            {
                "path": "w.bin",
                "size": len(data),
                "digest": f"sha256:{digest}",
                "urls": [f"models/{digest}"],
            }
        ],
    }


@dataclass
class RunningNode:
    """A node converged on snapshot 1, and what a fault scenario does with it."""

    node: NodeUnderTest
    simulator: RepositorySimulator
    server: FileServer
    podman: PodmanService
    images: dict[str, str]
    hooks: Path
    runtimes: list[dict[str, Any]]
    models: list[dict[str, Any]]
    last: Release | None = None  # the release published last

    @property
    def env(self) -> dict[str, str]:
        return agent_env(self.node.env, podman_url=self.podman.url, hooks=self.hooks)

    def agent(self, *wrapper: str) -> AgentCommand:
        cwd = self.node.home / "cwd"
        cwd.mkdir(exist_ok=True)
        return AgentCommand(env=self.env, cwd=cwd, wrapper=wrapper)

    def once(self) -> Outcome:
        return self.node.run("once", env=self.env)

    def publish(self, *, max_tokens: int = 2048) -> str:
        body = base_snapshot()
        body["models"] = self.models
        body["runtimes"] = self.runtimes
        body["jobs"]["max_tokens"] = max_tokens
        self.last = self.simulator.publish(body=body)
        return self.last.digest

    def containers(self) -> dict[str, tuple[str, str, Any]]:
        """name → (id, state, started at) of every container the service knows."""
        listed = json.loads(self.podman.cli("ps", "--all", "--format", "json").stdout or "[]")
        return {c["Names"][0]: (c["Id"], c["State"], c.get("StartedAt")) for c in listed}

    def head(self) -> str:
        return self.node.git("rev-parse", "HEAD").strip()

    def converged_on(self, digest: str) -> None:
        assert self.node.status()["applied"]["digest"] == digest
        assert converged_problems(self.env) == []


def one_line_naming(outcome: Reported, *words: str) -> str:
    """The single line that reports the failure; it must name every one of ``words``."""
    if isinstance(outcome, Finished):
        errors = outcome.reconcile_lines
    else:
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("reconcile: ")]
    lines = [*outcome.stdout.splitlines(), *errors]
    naming = [line for line in lines if all(w.lower() in line.lower() for w in words)]
    assert len(naming) == 1, f"no single line names {words}: {lines}\n{outcome.stderr[-3000:]}"
    assert len(errors) <= 1, errors
    return naming[0]


def make_running(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    server: FileServer,
    podman: PodmanService,
    images: dict[str, str],
    tmp_path: Path,
) -> RunningNode:
    running = RunningNode(
        node=node,
        simulator=simulator,
        server=server,
        podman=podman,
        images=images,
        hooks=tmp_path / "hooks",
        runtimes=[{"name": "web", "image": images["web"], "models": ["tiny:v1"]}],
        models=[served_model(server, "tiny", b"tiny model bytes")],
    )
    running.publish(max_tokens=1024)
    running.once().ok()
    return running


@pytest.fixture
def running(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
) -> RunningNode:
    return make_running(node, simulator, file_server, podman_clean, test_images, tmp_path)


# ---- the origin -------------------------------------------------------------------------------


def _other_network(running: RunningNode) -> Callable[[], None]:
    mainnet = RepositorySimulator(network="mainnet", root_keys=("main-1",))
    foreign = mainnet.release(5, body=base_snapshot("mainnet"))
    running.server.write("head.json", foreign.head)
    published = running.last
    assert published is not None
    return lambda: running.simulator.serve(published)


ORIGIN_FAULTS: dict[str, tuple[Fault | None, int, tuple[str, ...]]] = {
    # name: (fault on head.json, exit code of `once`, words of the one line)
    "slow": (Fault(trickle_s=0.5), 5, ("origin unreachable", "head.json", "2 s")),
    "cut-off": (Fault(cut_after=20, declared_length=400), 5, ("origin unreachable", "head.json")),
    "5xx": (Fault(status=503), 5, ("origin unreachable", "head.json", "HTTP 503")),
    "redirect-loop": (Fault(redirect="/head.json"), 5, ("origin unreachable", "redirects")),
    "other-network": (None, 4, ("rejected head.json", "valid signature")),
}


@pytest.mark.parametrize("name", sorted(ORIGIN_FAULTS))
def test_an_origin_fault_keeps_the_last_configuration_and_heals_by_itself(
    running: RunningNode, name: str
) -> None:
    fault, code, words = ORIGIN_FAULTS[name]
    before_head, before = running.head(), running.containers()
    wanted = running.publish()
    if fault is None:
        heal = _other_network(running)
    else:
        running.server.faults.set("/head.json", fault)

        def heal() -> None:
            running.server.faults.clear()

    outcome = running.node.run("once", env={**running.env, "RECONCILER_FETCH_TIMEOUT_S": "2"})

    assert outcome.exit_code == code, outcome.stdout + outcome.stderr
    line = one_line_naming(outcome, *words)
    assert "converged on serial 1" in outcome.stdout  # the last known, still in force
    assert running.head() == before_head
    assert running.containers() == before
    assert line.removeprefix("reconcile: ") in json.dumps(running.node.status(), ensure_ascii=False)
    heal()
    running.once().ok()
    running.converged_on(wanted)


def test_a_kill_between_moving_head_and_recording_it_is_not_taken_for_an_operators_hold(
    running: RunningNode,
) -> None:
    """The window the 500-kill campaign found: fetch moved main, then died before the node
    record learnt the new HEAD; the next pass put the node on hold for good, as if an
    operator had moved HEAD with git."""
    record_file = running.node.state_dir / "node-state.json"
    before = record_file.read_bytes()
    wanted = running.publish()
    running.node.fetch().ok()
    record_file.write_bytes(before)  # the kill came before the record was saved

    running.once().ok()

    assert running.node.status()["hold"]["active"] is False
    running.converged_on(wanted)
    # An operator's own move is still a hold.
    running.node.git("reset", "--hard", "HEAD~1")
    running.once()
    assert running.node.status()["hold"]["active"] is True


def test_a_kill_between_storing_a_snapshot_and_moving_head_to_it_is_finished_next_pass(
    running: RunningNode,
) -> None:
    """Another window of the campaign: the commit and its ref were written, main was not
    moved (its lock file left behind). The next fetch found the digest stored and called it
    current, so the node stayed one snapshot behind until the network published again."""
    history = running.node.state_dir / "snapshots" / ".git"
    record_file = running.node.state_dir / "node-state.json"
    before = record_file.read_bytes()
    wanted = running.publish()
    tip = running.head()
    running.node.fetch().ok()
    running.node.git("reset", "--hard", "-q", tip)  # as if main never moved
    record_file.write_bytes(before)  # nor the record was saved
    (history / "refs" / "heads" / "main.lock").write_bytes(b"")
    (history / "index.lock").write_bytes(b"")

    running.once().ok()

    assert running.node.status()["hold"]["active"] is False
    running.converged_on(wanted)
    assert not (history / "index.lock").exists()


def test_a_mirror_sending_one_byte_at_a_time_still_delivers_the_file(
    file_server: FileServer, tmp_path: Path
) -> None:
    """A slow mirror hands over thousands of one-byte reads before a batch is written; the
    writer once gave them to a single writev and failed with EINVAL past IOV_MAX buffers."""
    data = os.urandom(40_000)
    file_server.write("slow.bin", data)
    file_server.faults.set("/slow.bin", Fault(trickle_s=0.0))
    partial = tmp_path / "partial"
    with new_client() as client:
        download_file(
            client,
            urls=[file_server.url_for("slow.bin")],
            base_url=None,
            dest_partial=partial,
            size=len(data),
            digest="sha256:" + hashlib.sha256(data).hexdigest(),
            progress=None,
            deadline_s=60,
        )
    assert partial.read_bytes() == data


def test_git_lock_files_left_by_a_killed_writer_do_not_block_the_next_pass(
    running: RunningNode,
) -> None:
    """What a SIGKILL between libgit2's lock and rename leaves (found by the crash campaign):
    without cleanup, every later fetch failed with "failed to lock file"."""
    gitdir = running.node.repo / ".git"
    wanted = running.publish()
    leftovers = [
        "refs/reconciler/accepted.lock",
        "refs/heads/main.lock",
        f"refs/snapshots/{wanted[7:]}.lock",
        "refs/notes/applied.lock",
        "HEAD.lock",
        "index.lock",
    ]
    for name in leftovers:
        (gitdir / name).parent.mkdir(parents=True, exist_ok=True)
        (gitdir / name).write_bytes(b"")
    (gitdir / "objects" / "tmp_object_git2_x").write_bytes(b"half an object")
    # The model store's index is replaced the same way (found by the campaign, round 88).
    index_scratch = running.node.state_dir / "models" / "..index.json.abcd1234.tmp"
    index_scratch.write_bytes(b"{")

    running.once().ok()

    running.converged_on(wanted)
    assert [name for name in leftovers if (gitdir / name).exists()] == []
    assert not index_scratch.exists()


# ---- Podman and the registry ------------------------------------------------------------------


def _running_on(
    podman: PrivatePodman,
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    server: FileServer,
    images: dict[str, str],
    tmp_path: Path,
) -> RunningNode:
    return make_running(node, simulator, server, podman.service, images, tmp_path)


def test_podman_stopped_in_the_middle_of_an_apply_then_restarted(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    test_images: dict[str, str],
    private_podman: tuple[PrivatePodman, PrivateRegistry],
    tmp_path: Path,
) -> None:
    podman, _ = private_podman
    running = _running_on(podman, node, simulator, file_server, test_images, tmp_path)
    first = running.containers()["reconciler-web"]
    # Snapshot 2 adds two runtimes; the service goes away once the first is up.
    running.runtimes += [
        {"name": "more", "image": test_images["sleeper"]},
        {"name": "most", "image": test_images["sleeper"]},
    ]
    wanted = running.publish()
    process = running.agent().start("once")
    assert process.stderr is not None
    seen: list[str] = []

    def stop_after_first_create() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if "done create" in line:
                podman.stop()
                return

    watcher = threading.Thread(target=stop_after_first_create, daemon=True)
    watcher.start()
    watcher.join(timeout=120)
    out, err = process.communicate(timeout=120)
    outcome = Finished(process.returncode, out, "".join(seen) + err, 0.0)

    assert outcome.exit_code == 1, outcome.describe()
    one_line_naming(outcome, "Podman", "unreachable")
    podman.start()
    # The last known runtime ran on through the outage.
    assert running.containers()["reconciler-web"] == first
    assert running.node.status()["converged"] is False
    running.once().ok()
    running.converged_on(wanted)


def test_registry_down_keeps_the_runtime_and_the_next_pass_pulls(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    test_images: dict[str, str],
    private_podman: tuple[PrivatePodman, PrivateRegistry],
    tmp_path: Path,
) -> None:
    podman, spare = private_podman
    images = {name: spare.image(ref) for name, ref in test_images.items()}
    running = _running_on(podman, node, simulator, file_server, images, tmp_path)
    before = running.containers()
    running.runtimes = [{"name": "web", "image": images["web2"], "models": ["tiny:v1"]}]
    wanted = running.publish()
    spare.stop()

    outcome = running.once()

    assert outcome.exit_code == 1
    one_line_naming(outcome, "pull", images["web2"])
    assert running.containers() == before
    assert running.node.status()["last_error"]["kind"] == "apply"
    spare.start()
    running.once().ok()
    running.converged_on(wanted)


# ---- the disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(*commands: list[str], undo: list[str]) -> Iterator[None]:
    for command in commands:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(undo, check=False, capture_output=True, timeout=30)


@pytest.fixture
def small_disk_node(
    make_node: Callable[..., NodeUnderTest],
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
) -> Iterator[RunningNode]:
    """A running node whose state folder is an 8 MiB tmpfs."""
    state = tmp_path / "small" / "state"
    state.mkdir(parents=True)
    with mounted(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)],
        undo=["umount", "-l", str(state)],
    ):
        home = tmp_path / "small"
        node = NodeUnderTest(home)
        node.init(file_server.url, simulator.roots[1]).ok()
        yield make_running(node, simulator, file_server, podman_clean, test_images, tmp_path)
        podman_clean.cli("rm", "--all", "--force", "--time", "0", check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem under ``folder``."""
    filler = folder / "filler"
    info = os.statvfs(folder)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, info.f_bavail * info.f_frsize)
        while True:  # whatever the allocation left, page by page
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                return filler
    finally:
        os.close(fd)


def test_disk_filling_up_during_a_model_download(small_disk_node: RunningNode) -> None:
    running = small_disk_node
    before, before_head = running.containers(), running.head()
    data = bytes(range(256)) * 1024  # 256 KiB, trickled so the disk fills while it arrives
    big = served_model(running.server, "big", data)
    path = f"/{big['files'][0]['urls'][0]}"
    running.server.faults.set(path, Fault(body=data, trickle_s=0.0))
    running.models = [*running.models, big]
    wanted = running.publish()
    process = running.agent().start("once")
    deadline = time.monotonic() + 60
    # The download has begun once the mirror was asked (a file this small is held in memory
    # until verified, so no partial file shows it).
    while running.server.stats.requests(path) == 0:
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate(timeout=60)
            raise AssertionError(f"the download never began: {out}\n{err[-2000:]}")
        time.sleep(0.01)
    filler = fill(running.node.state_dir)
    out, err = process.communicate(timeout=120)
    outcome = Finished(process.returncode, out, err, 0.0)

    assert outcome.exit_code == 1, outcome.describe()
    one_line_naming(outcome, "disk full")
    assert running.containers() == before
    assert running.head() != before_head  # the snapshot was stored before the apply
    filler.unlink()
    running.server.faults.clear()
    running.once().ok()
    running.converged_on(wanted)


def test_disk_full_during_a_git_commit(small_disk_node: RunningNode) -> None:
    running = small_disk_node
    before, before_head = running.containers(), running.head()
    wanted = running.publish()
    filler = fill(running.node.state_dir)

    outcome = running.agent().run("once")

    assert outcome.exit_code == 1, outcome.describe()
    one_line_naming(outcome, "No space left")
    assert running.containers() == before
    assert running.head() == before_head
    filler.unlink()
    running.once().ok()
    running.converged_on(wanted)


def test_read_only_state_folder(running: RunningNode) -> None:
    before, before_head = running.containers(), running.head()
    wanted = running.publish()
    state = str(running.node.state_dir)
    with mounted(
        ["mount", "--bind", state, state],
        ["mount", "-o", "remount,bind,ro", state],
        undo=["umount", state],
    ):
        outcome = running.agent().run("once")

        assert outcome.exit_code == 1, outcome.describe()
        one_line_naming(outcome, "Read-only file system")
        assert running.containers() == before
        assert running.head() == before_head
    running.once().ok()
    running.converged_on(wanted)


# ---- the clock and the settings ------------------------------------------------------------------


def test_clock_far_in_the_future_rejects_everything_and_keeps_the_last_configuration(
    running: RunningNode,
) -> None:
    before, before_head = running.containers(), running.head()
    wanted = running.publish()
    future = running.agent("faketime", "2040-01-01 00:00:00")

    outcome = future.run("once")

    assert outcome.exit_code == 4, outcome.describe()
    one_line_naming(outcome, "rejected", "expired at")
    assert "converged on serial 1" in outcome.stdout
    assert running.containers() == before
    assert running.head() == before_head
    running.once().ok()
    running.converged_on(wanted)


def test_clock_far_in_the_past_still_refuses_an_older_snapshot(running: RunningNode) -> None:
    old = running.simulator.release(1, body=None)
    wanted = running.publish()
    past = running.agent("faketime", "2001-01-01 00:00:00")

    first = past.run("once")  # documents look fresh from 2001: this converges
    assert first.exit_code == 0, first.describe()
    running.converged_on(wanted)
    running.server.write("head.json", old.head)
    replay = past.run("fetch")

    assert replay.exit_code == 4, replay.describe()
    one_line_naming(replay, "rejected head.json", "below the last accepted")
    running.converged_on(wanted)


def test_malformed_settings_file_changes_nothing_until_fixed(running: RunningNode) -> None:
    before, before_head = running.containers(), running.head()
    wanted = running.publish()
    config = running.node.config
    good = config.read_bytes()
    config.write_bytes(good + b"\nkeep_applied = [oops\n")

    outcome = running.agent().run("once")

    assert outcome.exit_code == 2, outcome.describe()
    line = one_line_naming(outcome, str(config), "does not parse")
    assert line.startswith("reconcile: ")
    assert running.containers() == before
    assert running.head() == before_head
    config.write_bytes(good)
    running.once().ok()
    running.converged_on(wanted)
