"""Containers through the ``reconcile`` command: plan, once, replace, remove, drift, failures.

Each test serves signed snapshots from a loopback origin (``RepositorySimulator`` behind the
``file_server``), runs the real CLI against a private Podman service and pinned images in a
loopback registry, and checks the result from outside with the podman CLI and
``reconcile status``. An unmanaged container whose name looks like the runtime's
(``reconciler-web-old``) runs beside every scenario and must survive every pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.specs import LABEL_CONFIG_DIGEST, LABEL_MANAGED, LABEL_SPEC
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import Release, RepositorySimulator, base_snapshot

pytestmark = pytest.mark.podman

CONTAINER = "reconciler-web"
BYSTANDER = "reconciler-web-old"  # unmanaged, and named like a runtime container


@dataclass
class Agent:
    """A node initialised against the served origin, and the Podman service it drives."""

    node: NodeUnderTest
    simulator: RepositorySimulator
    server: FileServer
    podman: PodmanService
    images: dict[str, str]
    env: dict[str, str]

    def publish(self, *, runtimes: list[dict[str, Any]], **body: Any) -> Release:
        snapshot = base_snapshot()
        snapshot["models"] = []
        snapshot["runtimes"] = runtimes
        snapshot.update(body)
        return self.simulator.publish(body=snapshot)

    def run(self, *args: str, **env: str) -> Outcome:
        return self.node.run(*args, env={**self.env, **env})

    def once(self) -> Outcome:
        return self.run("once")

    def inspect(self, name: str) -> dict[str, Any] | None:
        done = self.podman.cli("container", "inspect", name, check=False)
        if done.returncode != 0:
            return None
        return dict(json.loads(done.stdout)[0])

    def running(self, name: str = CONTAINER) -> dict[str, Any]:
        info = self.inspect(name)
        assert info is not None, f"{name} does not exist"
        assert info["State"]["Status"] == "running", info["State"]
        return info

    def names(self) -> set[str]:
        listed = self.podman.cli("ps", "--all", "--format", "{{.Names}}").stdout
        return set(listed.split())

    def bystander_alive(self) -> None:
        info = self.running(BYSTANDER)
        assert LABEL_MANAGED not in (info["Config"]["Labels"] or {})


def web(images: dict[str, str], image: str = "web") -> dict[str, Any]:
    return {"name": "web", "image": images[image]}


@pytest.fixture
def agent(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
) -> Iterator[Agent]:
    podman_clean.cli(
        "run", "--detach", "--name", BYSTANDER, "--network", "none", test_images["sleeper"]
    )
    yield Agent(
        node=node,
        simulator=simulator,
        server=file_server,
        podman=podman_clean,
        images=test_images,
        env={
            "RECONCILER_PODMAN_URL": podman_clean.url,
            "RECONCILER_DISK_RESERVE_BYTES": "0",
            "RECONCILER_HOOKS_DIR": str(tmp_path / "no-hooks"),
        },
    )


def _converged(outcome: Outcome) -> Outcome:
    assert outcome.exit_code == 0, f"exit {outcome.exit_code}: {outcome.stdout}{outcome.stderr}"
    assert "converged on serial" in outcome.stdout
    return outcome


# --- plan, then once ----------------------------------------------------------------------------


def test_plan_shows_pending_runtime_then_once_brings_it_up_from_the_pinned_image(
    agent: Agent,
) -> None:
    release = agent.publish(runtimes=[web(agent.images)])
    agent.run("fetch").ok()
    requests_before = agent.server.stats.total_requests()

    text = agent.run("plan").ok()
    assert f"HEAD serial {release.serial} {release.digest}" in text.stdout
    assert f"pull {agent.images['web']} for {CONTAINER} (runtime web)" in text.stdout
    assert f"create {CONTAINER} (runtime web): missing" in text.stdout

    pending = agent.run("plan", "--exit-code")
    assert pending.exit_code == 3, pending.stdout + pending.stderr

    as_json = agent.run("plan", "--json").ok()
    document = json.loads(as_json.stdout)  # the whole output is one JSON object
    assert isinstance(document, dict)
    assert document["config_digest"] == release.digest
    assert document["empty"] is False
    assert [(a["kind"], a["container"]) for a in document["containers"]["actions"]] == [
        ("pull", CONTAINER),
        ("create", CONTAINER),
    ]
    assert agent.server.stats.total_requests() == requests_before, "plan contacted the origin"
    assert agent.inspect(CONTAINER) is None, "plan changed something"

    _converged(agent.once())

    info = agent.running()
    assert info["ImageName"] == agent.images["web"]
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_CONFIG_DIGEST] == release.digest
    assert len(labels[LABEL_SPEC]) == 64
    settled = agent.run("plan", "--exit-code")
    assert settled.exit_code == 0, settled.stdout + settled.stderr
    assert "nothing to do" in settled.stdout
    assert json.loads(agent.run("plan", "--json").ok().stdout)["empty"] is True
    status = agent.node.status()
    assert status["converged"] is True
    assert status["applied"]["digest"] == release.digest
    agent.bystander_alive()


# --- snapshots that change the runtime ----------------------------------------------------------


def test_new_image_replaces_the_container_and_the_old_one_is_gone(agent: Agent) -> None:
    agent.publish(runtimes=[web(agent.images)])
    _converged(agent.once())
    old = agent.running()

    release = agent.publish(runtimes=[web(agent.images, "web2")])
    _converged(agent.once())

    new = agent.running()
    assert new["Id"] != old["Id"]
    assert new["ImageName"] == agent.images["web2"]
    assert new["Config"]["Labels"][LABEL_CONFIG_DIGEST] == release.digest
    assert new["Config"]["Labels"][LABEL_SPEC] != old["Config"]["Labels"][LABEL_SPEC]
    assert agent.inspect(old["Id"]) is None
    assert agent.names() == {CONTAINER, BYSTANDER}
    agent.bystander_alive()


def test_runtime_dropped_from_the_snapshot_removes_its_container(agent: Agent) -> None:
    agent.publish(runtimes=[web(agent.images)])
    _converged(agent.once())
    agent.running()

    agent.publish(runtimes=[])
    _converged(agent.once())

    assert agent.names() == {BYSTANDER}
    agent.bystander_alive()
    again = agent.run("plan", "--exit-code")
    assert again.exit_code == 0, again.stdout


# --- drift ----------------------------------------------------------------------------------------


def test_next_once_repairs_a_removed_a_stopped_and_a_hand_edited_container(agent: Agent) -> None:
    release = agent.publish(runtimes=[web(agent.images)])
    _converged(agent.once())
    first = agent.running()
    spec = first["Config"]["Labels"][LABEL_SPEC]

    # Removed by hand: created again.
    agent.podman.cli("rm", "--force", "--time", "0", CONTAINER)
    assert agent.run("plan", "--exit-code").exit_code == 3
    _converged(agent.once())
    recreated = agent.running()
    assert recreated["Id"] != first["Id"]

    # Stopped by hand: the same container is started again.
    agent.podman.cli("stop", "--time", "1", CONTAINER)
    plan = json.loads(agent.run("plan", "--json").ok().stdout)
    assert [a["kind"] for a in plan["containers"]["actions"]] == ["start"]
    _converged(agent.once())
    assert agent.running()["Id"] == recreated["Id"]

    # Re-made by hand with an edited spec label (Podman cannot edit labels in place): replaced.
    agent.podman.cli("rm", "--force", "--time", "0", CONTAINER)
    agent.podman.cli(
        "run",
        "--detach",
        "--name",
        CONTAINER,
        "--network",
        "none",
        "--label",
        f"{LABEL_MANAGED}=true",
        "--label",
        f"{LABEL_SPEC}={'0' * 64}",
        "--label",
        f"{LABEL_CONFIG_DIGEST}={release.digest}",
        agent.images["web"],
    )
    edited = agent.running()
    plan = json.loads(agent.run("plan", "--json").ok().stdout)
    assert [a["kind"] for a in plan["containers"]["actions"]] == ["pull", "replace"]
    _converged(agent.once())
    repaired = agent.running()
    assert repaired["Id"] != edited["Id"]
    assert repaired["Config"]["Labels"][LABEL_SPEC] == spec

    assert agent.names() == {CONTAINER, BYSTANDER}
    agent.bystander_alive()
    assert agent.node.status()["converged"] is True


# --- failures that are not the snapshot's fault --------------------------------------------------


def test_pinned_digest_missing_from_registry_fails_in_one_line_and_leaves_the_runtime_alone(
    agent: Agent,
) -> None:
    first = agent.publish(runtimes=[web(agent.images)])
    _converged(agent.once())
    before = agent.running()
    runtime_dir = agent.node.state_dir / "runtime"
    runtime_files = {p.name: p.read_bytes() for p in sorted(runtime_dir.iterdir())}

    repository = agent.images["web"].rsplit("@", 1)[0]
    absent = f"{repository}@sha256:{'ab' * 32}"
    second = agent.publish(
        runtimes=[{"name": "web", "image": absent}],
        jobs={"max_tokens": 8192, "max_queue": 16, "timeout_s": 120},
    )
    failed = agent.once()

    assert failed.exit_code == 1, failed.stdout + failed.stderr
    lines = failed.stdout.splitlines()
    assert len(lines) == 1, failed.stdout
    assert absent in lines[0]
    assert "pulling" in lines[0]
    after = agent.running()
    assert after["Id"] == before["Id"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    # Not even the files the running container reads changed.
    assert {p.name: p.read_bytes() for p in sorted(runtime_dir.iterdir())} == runtime_files
    status = agent.node.status()
    assert status["quarantined"] == []
    assert status["converged"] is False
    assert status["head"]["digest"] == second.digest
    assert status["applied"]["digest"] == first.digest
    assert absent in status["last_error"]["message"]
    agent.bystander_alive()


def test_podman_down_fails_in_one_line_and_records_nothing_as_applied(
    agent: Agent, tmp_path: Path
) -> None:
    first = agent.publish(runtimes=[web(agent.images)])
    _converged(agent.once())
    applied = agent.node.status()["applied"]

    second = agent.publish(runtimes=[web(agent.images, "web2")])
    dead = tmp_path / "dead.sock"
    failed = agent.run("once", RECONCILER_PODMAN_URL=f"unix://{dead}")

    assert failed.exit_code == 1, failed.stdout + failed.stderr
    lines = failed.stdout.splitlines()
    assert len(lines) == 1, failed.stdout
    assert "Podman" in lines[0]
    assert "unreachable" in lines[0]
    assert str(dead) in lines[0]
    status = agent.node.status()
    assert status["applied"] == applied
    assert status["applied"]["digest"] == first.digest
    assert status["head"]["digest"] == second.digest
    assert status["converged"] is False
    assert status["quarantined"] == []
    assert "Podman" in status["last_error"]["message"]
    assert "unreachable" in status["last_error"]["message"]
    # The runtime kept running the old image; the next pass with Podman back converges.
    assert agent.running()["ImageName"] == agent.images["web"]
    _converged(agent.once())
    assert agent.running()["ImageName"] == agent.images["web2"]
    agent.bystander_alive()
