"""Models through the ``reconcile`` command: install, progress, states, failures, retention.

Each test serves signed snapshots and model files from one loopback server (the origin's
folder; mirrors are relative URLs resolved against it), runs the real CLI, and looks at the
result on disk, in ``reconcile status`` and in the server's counters. Every pass also talks
to a private Podman service (a converge observes containers even when there are none).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import Release, RepositorySimulator, base_snapshot

pytestmark = pytest.mark.podman

MIB = 1024 * 1024


def content(seed: str, size: int) -> bytes:
    """``size`` reproducible bytes that differ per seed."""
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Served:
    """A model as published: its snapshot entry and the bytes of each file."""

    entry: dict[str, Any]
    files: dict[str, bytes]

    @property
    def id(self) -> str:
        return f"{self.entry['name']}:{self.entry['version']}"

    def url_path(self, path: str) -> str:
        """The server path its first mirror names (what the counters are keyed by)."""
        for file in self.entry["files"]:
            if file["path"] == path:
                return "/" + str(file["urls"][0])
        raise KeyError(path)


@dataclass
class Agent:
    node: NodeUnderTest
    simulator: RepositorySimulator
    server: FileServer
    env: dict[str, str]

    def model(
        self,
        name: str,
        files: Mapping[str, bytes],
        *,
        version: str = "v1",
        urls: Mapping[str, str] | None = None,
    ) -> Served:
        """Put the files on the server and describe them as the snapshot would."""
        entries = []
        for path, data in files.items():
            where = (urls or {}).get(path, f"models/{name}/{version}/{path}")
            self.server.write(where, data)
            entries.append(
                {"path": path, "size": len(data), "digest": sha256(data), "urls": [where]}
            )
        return Served({"name": name, "version": version, "files": entries}, dict(files))

    def publish(self, *models: Served, **body: Any) -> Release:
        snapshot = base_snapshot()
        snapshot["models"] = [m.entry for m in models]
        snapshot.update(body)
        return self.simulator.publish(body=snapshot)

    def run(self, *args: str, **env: str) -> Outcome:
        return self.node.run(*args, env={**self.env, **env})

    @property
    def models_dir(self) -> Path:
        return self.node.state_dir / "models"

    def tree(self, model: Served) -> Path:
        return self.models_dir / str(model.entry["name"]) / str(model.entry["version"])

    def blob(self, data: bytes) -> Path:
        return self.models_dir / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()

    def installed(self, model: Served) -> bool:
        tree = self.tree(model)
        return all(
            (tree / path).is_file() and (tree / path).read_bytes() == data
            for path, data in model.files.items()
        )

    def partials(self) -> list[Path]:
        folder = self.node.state_dir / "work" / "models" / "partial"
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def states(self) -> dict[str, str]:
        return {m["id"]: m["state"] for m in self.node.status()["models"]}


def environment(podman: PodmanService, tmp_path: Path) -> dict[str, str]:
    return {
        "RECONCILER_PODMAN_URL": podman.url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(tmp_path / "no-hooks"),
    }


@pytest.fixture
def agent(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    tmp_path: Path,
) -> Agent:
    return Agent(node, simulator, file_server, environment(podman_clean, tmp_path))


def converged(outcome: Outcome) -> Outcome:
    assert outcome.exit_code == 0, f"exit {outcome.exit_code}: {outcome.stdout}{outcome.stderr}"
    assert "converged on serial" in outcome.stdout, outcome.stdout
    return outcome


def one_line(outcome: Outcome) -> str:
    """A failed ``once`` says why in exactly one line."""
    assert outcome.exit_code == 1, f"exit {outcome.exit_code}: {outcome.stdout}{outcome.stderr}"
    lines = outcome.stdout.splitlines()
    assert len(lines) == 1, outcome.stdout
    return lines[0]


# --- installing -----------------------------------------------------------------------------


def multi_file_model(agent: Agent) -> Served:
    return agent.model(
        "tiny",
        {
            "config.json": b'{"layers": 2}\n',
            "weights/part-1.bin": content("part-1", 3 * MIB),
            "weights/part-2.bin": content("part-2", 2 * MIB + 17),
        },
    )


def test_once_installs_a_multi_file_model_logging_progress_when_not_on_a_terminal(
    agent: Agent,
) -> None:
    model = multi_file_model(agent)
    agent.publish(model)

    done = converged(agent.run("once"))

    assert "1 model(s) installed" in done.stdout
    assert agent.installed(model)
    for path, data in model.files.items():
        assert (agent.tree(model) / path).stat().st_ino == agent.blob(data).stat().st_ino
    log = done.stderr
    assert "fetching 3 model file(s), 5.0 MiB" in log
    assert len([line for line in log.splitlines() if " models: " in line]) >= 2, log
    assert "fetched tiny:v1/weights/part-1.bin" in log
    assert "\r" not in log
    assert agent.states() == {"tiny:v1": "Active"}
    assert "tiny:v1" in agent.node.status_text()


def test_once_on_a_terminal_draws_a_progress_bar(agent: Agent) -> None:
    model = multi_file_model(agent)
    agent.publish(model)

    code, output = run_on_pty(
        ["once"], env={**agent.node.env, **agent.env, "COLUMNS": "200"}, cwd=agent.node.home
    )

    assert code == 0, output
    assert agent.installed(model)
    assert "\rmodels " in output, output
    assert "models 3/3 5.0 MiB/5.0 MiB 100%" in output, output
    assert "fetching 3 model file(s)" not in output  # the bar replaces the log lines


def run_on_pty(args: list[str], *, env: Mapping[str, str], cwd: Path) -> tuple[int, str]:
    """``reconcile ARGS`` in a child process whose stdout and stderr are a pseudo-terminal."""
    primary, secondary = pty.openpty()
    command = [sys.executable, "-c", "from reconciler.cli import main; main()", *args]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, **env},
        cwd=cwd,
        close_fds=True,
    )
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_two_models_sharing_a_file_fetch_it_once(agent: Agent) -> None:
    shared = content("tokenizer", 300_000)
    first = agent.model(
        "alpha",
        {"tokenizer.json": shared, "weights.bin": content("alpha", 1000)},
        urls={"tokenizer.json": "mirror-a/tokenizer.json"},
    )
    second = agent.model(
        "beta",
        {"tokenizer.json": shared, "weights.bin": content("beta", 1000)},
        urls={"tokenizer.json": "mirror-b/tokenizer.json"},
    )
    agent.publish(first, second)

    converged(agent.run("once"))

    stats = agent.server.stats
    assert (
        stats.requests("/mirror-a/tokenizer.json") + stats.requests("/mirror-b/tokenizer.json") == 1
    )
    assert stats.body_bytes("/mirror-a/tokenizer.json") + stats.body_bytes(
        "/mirror-b/tokenizer.json"
    ) == len(shared)
    assert agent.installed(first) and agent.installed(second)
    inodes = {(agent.tree(m) / "tokenizer.json").stat().st_ino for m in (first, second)}
    assert inodes == {agent.blob(shared).stat().st_ino}
    assert agent.states() == {"alpha:v1": "Active", "beta:v1": "Active"}


# --- states and failures ---------------------------------------------------------------------


def test_status_shows_pending_active_failed_and_inactive_models(agent: Agent) -> None:
    old = agent.model("old", {"weights.bin": content("old", 1000)})
    agent.publish(old)
    converged(agent.run("once"))
    assert agent.states() == {"old:v1": "Active"}

    good = agent.model("good", {"weights.bin": content("good", 1000)})
    broken = agent.model("broken", {"weights.bin": content("broken", 1000)})
    offline = agent.model("offline", {"weights.bin": content("offline", 1000)})
    agent.server.faults.set(broken.url_path("weights.bin"), body=content("other", 1000))
    agent.server.faults.set(offline.url_path("weights.bin"), status=503)
    agent.publish(good, broken, offline)
    one_line(agent.run("once"))

    assert agent.states() == {
        "good:v1": "Active",
        "broken:v1": "Failed",
        "offline:v1": "Pending",
        "old:v1": "Inactive",  # not wanted, still on disk: the apply stopped before pruning
    }
    reasons = {m["id"]: m["reason"] for m in agent.node.status()["models"]}
    assert "failed verification" in reasons["broken:v1"]
    assert "503" in reasons["offline:v1"]
    text = agent.node.status_text()
    for model_id, state in (
        ("good:v1", "Active"),
        ("broken:v1", "Failed"),
        ("offline:v1", "Pending"),
        ("old:v1", "Inactive"),
    ):
        assert any(model_id in line and state in line for line in text.splitlines()), text


def test_wrong_bytes_on_the_mirror_fail_the_model_in_one_line_until_the_mirror_is_fixed(
    agent: Agent,
) -> None:
    model = agent.model("mistral", {"config.json": b"{}\n", "weights.bin": content("w", MIB)})
    agent.server.faults.set(model.url_path("weights.bin"), body=content("tampered", MIB))
    release = agent.publish(model)

    line = one_line(agent.run("once"))

    assert line.startswith("mistral:v1/weights.bin failed verification"), line
    assert not agent.tree(model).exists()
    assert not agent.blob(model.files["weights.bin"]).exists()
    assert agent.partials() == []
    status = agent.node.status()
    assert status["quarantined"] == []
    assert status["converged"] is False
    assert status["applied"]["digest"] is None
    assert "failed verification" in status["last_error"]["message"]
    assert agent.states() == {"mistral:v1": "Failed"}

    agent.server.faults.clear()
    converged(agent.run("once"))

    assert agent.installed(model)
    assert agent.states() == {"mistral:v1": "Active"}
    assert agent.node.status()["applied"]["digest"] == release.digest


def test_once_offline_with_a_missing_file_fails_without_contacting_the_server(
    agent: Agent,
) -> None:
    model = agent.model("tiny", {"weights.bin": content("w", 1000)})
    agent.publish(model)
    agent.run("fetch").ok()
    agent.server.stats.reset()

    line = one_line(agent.run("once", "--offline"))

    assert line == "offline: 1 model file(s) are not on disk (first: tiny:v1/weights.bin)"
    assert agent.server.stats.total_requests() == 0
    assert not agent.tree(model).exists()
    assert agent.node.status()["converged"] is False


# --- on-disk damage -------------------------------------------------------------------------


@pytest.mark.parametrize("keep_stat", [False, True], ids=["edited", "bit-rot"])
def test_verify_names_a_corrupted_blob_and_the_next_once_repairs_it(
    agent: Agent, keep_stat: bool
) -> None:
    model = agent.model("tiny", {"a.bin": content("a", 4096), "b.bin": content("b", 4096)})
    agent.publish(model)
    converged(agent.run("once"))
    assert agent.run("verify").exit_code == 0
    blob = agent.blob(model.files["a.bin"])
    before = blob.stat()

    with blob.open("r+b") as handle:  # root ignores the blob's read-only mode
        handle.seek(100)
        handle.write(b"X")
    if keep_stat:  # bit rot: the bytes change, the stat does not
        os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))

    found = agent.run("verify")
    assert found.exit_code == 1, found.stdout
    bad = [line for line in found.stdout.splitlines() if line.startswith("BAD")]
    assert bad, found.stdout
    assert any(str(blob) in line for line in bad), found.stdout
    assert any(str(agent.tree(model) / "a.bin") in line for line in bad), found.stdout
    assert not any("b.bin" in line for line in bad)
    assert (agent.tree(model) / "a.bin").read_bytes() != model.files["a.bin"], "verify repaired"

    converged(agent.run("once"))

    assert agent.installed(model)
    assert agent.server.stats.requests(model.url_path("a.bin")) == 2
    assert agent.server.stats.requests(model.url_path("b.bin")) == 1
    assert agent.run("verify").exit_code == 0


# --- retention and rollback -----------------------------------------------------------------


def test_dropped_model_is_removed_and_its_blobs_kept_for_keep_applied_snapshots(
    agent: Agent,
) -> None:
    env = {"RECONCILER_KEEP_APPLIED": "2"}
    old = agent.model("old", {"a.bin": content("old-a", 2000), "b.bin": content("old-b", 2000)})
    new = agent.model("new", {"weights.bin": content("new", 2000)})
    agent.publish(old)
    converged(agent.run("once", **env))
    assert agent.installed(old)

    agent.publish(new)
    converged(agent.run("once", **env))
    assert not agent.tree(old).exists()
    assert not (agent.models_dir / "old").exists()
    assert agent.states() == {"new:v1": "Active"}
    kept = [agent.blob(data) for data in old.files.values()]
    assert all(b.exists() for b in kept), "collected right after the snapshot that dropped it"

    agent.publish(new, jobs={"max_tokens": 1, "max_queue": 1, "timeout_s": 1})
    converged(agent.run("once", **env))
    assert all(b.exists() for b in kept), "collected while within keep_applied"

    agent.publish(new, jobs={"max_tokens": 2, "max_queue": 2, "timeout_s": 2})
    converged(agent.run("once", **env))
    assert not any(b.exists() for b in kept)
    assert agent.blob(new.files["weights.bin"]).exists()
    assert agent.installed(new)


def test_rollback_within_the_retention_window_needs_no_origin(agent: Agent) -> None:
    old = agent.model("old", {"weights.bin": content("old", 100_000)})
    new = agent.model("new", {"weights.bin": content("new", 100_000)})
    first = agent.publish(old)
    converged(agent.run("once"))
    agent.publish(new)
    converged(agent.run("once"))
    assert not agent.tree(old).exists()
    requests = agent.server.stats.total_requests()
    agent.server.close()  # the origin and its mirrors are gone

    back = agent.run("rollback")

    assert back.exit_code == 0, back.stdout + back.stderr
    assert agent.installed(old)
    assert not agent.tree(new).exists()
    assert agent.server.stats.total_requests() == requests
    status = agent.node.status()
    assert status["applied"]["digest"] == first.digest
    assert status["head"]["reason"] == "rollback"
    assert status["hold"]["active"] is True
    assert status["converged"] is True
    assert agent.states() == {"old:v1": "Active"}


# --- a disk too small -----------------------------------------------------------------------


@pytest.fixture
def small_disk_node(
    tmp_path: Path,
    _clean_environment: None,
    file_server: FileServer,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
) -> Iterator[Agent]:
    """A node whose whole state folder is an 8 MiB tmpfs."""
    home = tmp_path / "small"
    state = home / "state"
    state.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0 or shutil.which("umount") is None:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        node = NodeUnderTest(home)
        node.init(file_server.url, simulator.roots[1]).ok()
        yield Agent(node, simulator, file_server, environment(podman_clean, tmp_path))
    finally:
        if subprocess.run(["umount", str(state)], check=False).returncode != 0:
            with contextlib.suppress(OSError):
                subprocess.run(["umount", "-l", str(state)], check=False)


def test_disk_too_small_fails_in_one_line_before_anything_changes(
    small_disk_node: Agent,
) -> None:
    agent = small_disk_node
    small = agent.model("small", {"weights.bin": content("small", 1000)})
    first = agent.publish(small)
    converged(agent.run("once"))
    jobs = (agent.node.state_dir / "runtime" / "jobs.json").read_bytes()

    big = agent.model("big", {"weights.bin": content("big", 12 * MIB)})
    agent.publish(small, big, jobs={"max_tokens": 1, "max_queue": 1, "timeout_s": 1})
    line = one_line(agent.run("once"))

    assert line.startswith("not enough disk space for model files: 12.0 MiB to download"), line
    assert str(agent.node.state_dir / "models") in line
    assert agent.server.stats.requests(big.url_path("weights.bin")) == 0
    assert not agent.tree(big).exists()
    assert agent.partials() == []
    assert agent.installed(small)
    assert (agent.node.state_dir / "runtime" / "jobs.json").read_bytes() == jobs
    status = agent.node.status()
    assert status["applied"]["digest"] == first.digest
    assert status["converged"] is False
    assert status["quarantined"] == []
    assert "not enough disk space" in status["last_error"]["message"]
