"""Crash safety: ``reconcile once`` SIGKILLed at every step boundary and at random moments.

The agent is killed through its test seam (``RECONCILER_TEST_DIE_AT=<step>``, see
``reconciler.apply.crash.CRASH_POINTS``), which SIGKILLs the process from inside, or from outside
after a random delay. After each kill the next ``once`` must converge, and the node must hold
no trace of the crash: no temporary files, no ``-NEXT`` or duplicated containers, no partial
downloads, a clean ``git fsck``, and receipts that tell what happened (an ``interrupted``
receipt for the attempt that died).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.crash import CRASH_POINTS
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, stock_git
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import (
    AGENT_COMMAND,
    containers,
    converged,
    head,
    node_env,
    once,
    receipts,
    running,
    runtime,
    served_model,
    snapshot_body,
    write_hook,
)
from tests.support.signing import Release, RepositorySimulator

pytestmark = pytest.mark.podman

# Killed here, the attempt had already recorded convergence: its receipt, written by the
# next pass, says it converged (and that it was written late).
_RECORDED = "before-receipt"


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    return tmp_path / "hooks"


@pytest.fixture
def env(podman_clean: PodmanService, hooks: Path) -> dict[str, str]:
    return node_env(podman_clean, hooks)


def _bodies(server: FileServer, images: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Snapshot 1, and a snapshot 2 that changes every part: a new model (the old one
    pruned), a replaced runtime (start-first), a new runtime, new jobs."""
    one = served_model(server, "tiny", "v1", {"w.bin": os.urandom(2 << 20), "c.json": b"{}"})
    two = served_model(server, "tiny", "v2", {"w.bin": os.urandom(2 << 20), "c.json": b"[]"})
    web = runtime("web", images["web"], update="start-first", models=["tiny:v1"])
    first = snapshot_body(models=[one], runtimes=[web])
    second = snapshot_body(
        models=[two],
        runtimes=[
            {**web, "image": images["web2"], "models": ["tiny:v2"]},
            runtime("sleeper", images["sleeper"], notify="signal:HUP", models=["tiny:v2"]),
        ],
        jobs={"max_tokens": 8192, "max_queue": 4, "timeout_s": 30},
    )
    return first, second


@pytest.fixture
def crash_scene(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
) -> Release:
    """Snapshot 1 converged, snapshot 2 published; hooks that leave a trace. Returns 2."""
    write_hook(hooks, "pre-apply", "echo pre-apply ok")
    write_hook(hooks, "post-apply", "echo post-apply $RECONCILE_RESULT")
    first, second = _bodies(file_server, test_images)
    simulator.publish(body=first)
    converged(once(node, env))
    return simulator.publish(body=second)


def _run_agent(node: NodeUnderTest, env: dict[str, str], *, kill_after: float | None) -> int:
    """``reconcile once`` in a process of its own; killed after ``kill_after`` seconds."""
    process = subprocess.Popen(
        [*AGENT_COMMAND, "once"],
        env={**os.environ, **node.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


def _leftovers(node: NodeUnderTest) -> list[str]:
    """Traces a crash may leave in the state folder."""
    found = []
    for path in node.state_dir.rglob("*"):
        name = path.name
        if name.endswith(".tmp") or name.startswith("tmp_object"):
            found.append(str(path))
        if path.suffix == ".lock" and ".git" in path.parts:
            found.append(str(path))
    work = node.state_dir / "work" / "models"
    for scratch in ("partial", "trees", "trash"):
        folder = work / scratch
        if folder.exists():
            found.extend(str(p) for p in folder.iterdir())
    return found


def _check_recovered(
    node: NodeUnderTest, podman: PodmanService, release: Release, env: dict[str, str]
) -> list[str]:
    """The next ``once`` converges and the node is clean. Returns the receipts' results."""
    converged(once(node, env))
    names = sorted(c["name"] for c in containers(podman))
    assert names == ["reconciler-sleeper", "reconciler-web"], names
    assert set(running(podman)) == {"reconciler-sleeper", "reconciler-web"}
    assert _leftovers(node) == []
    assert not (node.state_dir / "models" / "tiny" / "v1").exists()
    assert (node.state_dir / "models" / "tiny" / "v2" / "c.json").read_bytes() == b"[]"
    assert b"8192" in (node.state_dir / "runtime" / "jobs.json").read_bytes()
    fsck = subprocess.run(
        ["git", "-C", str(node.repo), "fsck", "--no-dangling"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert fsck.stdout.strip() == ""
    status = node.status()
    assert status["converged"] is True
    assert status["applied"]["digest"] == release.digest
    assert status["quarantined"] == []
    assert node.record()["apply_in_progress"] is None
    verify = node.run("verify")
    assert verify.exit_code == 0, verify.stdout
    commit = head(node)["commit"]
    assert commit == stock_git(node.repo, "rev-parse", "main").decode().strip()
    first_commit = stock_git(node.repo, "rev-parse", "main~1").decode().strip()
    assert [r["result"] for r in receipts(node, first_commit)] == ["converged"]
    return [r["result"] for r in receipts(node, commit)]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_each_step_boundary_is_recovered_by_the_next_pass(
    point: str,
    node: NodeUnderTest,
    crash_scene: Release,
    podman_clean: PodmanService,
    env: dict[str, str],
) -> None:
    code = _run_agent(node, {**env, "RECONCILER_TEST_DIE_AT": point}, kill_after=None)

    assert code == -signal.SIGKILL
    marker = node.record()["apply_in_progress"]
    assert marker["digest"] == crash_scene.digest
    results = _check_recovered(node, podman_clean, crash_scene, env)

    first = receipts(node, head(node)["commit"])[0]
    assert first["started_at"] == marker["started_at"]
    if point == _RECORDED:
        assert results == ["converged"]
        assert "before writing this receipt" in first["note"]
    else:
        # The attempt that died, then the pass that finished the work (or found it done).
        assert results == ["interrupted", "converged"]
        assert "interrupted" in first["error"]


@pytest.mark.parametrize("seed", [1, 3, 7, 9, 5, 6, 2])
def test_a_crash_at_a_random_moment_is_recovered_by_the_next_pass(
    seed: int,
    node: NodeUnderTest,
    crash_scene: Release,
    podman_clean: PodmanService,
    env: dict[str, str],
) -> None:
    started = time.monotonic()
    _run_agent(node, env, kill_after=random.Random(seed).uniform(0.3, 3.0))
    print(f"killed after {time.monotonic() - started:.2f} s")

    results = _check_recovered(node, podman_clean, crash_scene, env)

    # Whatever the moment, each attempt left at most one receipt and the last one says the
    # node converged, or that the attempt that did the work died before saying so.
    assert results in (
        ["converged"],
        ["interrupted"],
        ["interrupted", "converged"],
    ), results
