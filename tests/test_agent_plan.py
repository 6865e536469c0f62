"""``reconcile plan`` tells what the next converged pass does about the agent (contract §10).

The rules are table-tested on records built with ``core.agentrelease``'s own transitions;
one test runs ``plan`` through the CLI on a real node (real origin on 127.0.0.1, real git
history, the private Podman service) whose HEAD approves another agent version. No wheel
is built: the plan reads HEAD, the settings and ``agent/state.json`` and installs nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from reconciler import __version__
from reconciler.core.agentrelease import (
    AgentRecord,
    AgentRelease,
    Artifact,
    base_seen,
    marked_good,
    refused,
    selected_release,
    started,
)
from reconciler.selfupdate.folder import AgentFolder
from reconciler.selfupdate.plan import AgentPlan, HookState, agent_plan, read_agent_plan
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import snapshot_body, write_hook
from tests.support.signing import RepositorySimulator

A, B = "a" * 64, "b" * 64
BASE = __version__


def _release(
    version: str, hex_digest: str, *, urls: tuple[str, ...] = ("agent/r.whl",)
) -> AgentRelease:
    wheel = Artifact(name="r.whl", digest="sha256:" + hex_digest, size=10, urls=urls)
    return AgentRelease(
        version=version, digest="sha256:" + hex_digest, wheel=wheel if urls else None, requires=()
    )


def _base() -> AgentRecord:
    return base_seen(AgentRecord(), version=BASE, python="/usr/bin/python3", site=())


def _plan(
    record: AgentRecord,
    release: AgentRelease | None,
    *,
    installed: set[str] | None = None,
    self_update: bool = True,
    min_version: str = "",
    hook: HookState = "absent",
) -> AgentPlan:
    return agent_plan(
        record,
        release,
        installed=installed or set(),
        downloaded=0,
        self_update=self_update,
        min_version=min_version,
        hook=hook,
    )


def test_plan_text_for_each_case_of_the_installer() -> None:
    two = _release("0.2.0", A, urls=("agent/r.whl", "https://m.example/r.whl"))
    plan = _plan(_base(), two)
    assert plan.describe() == [f"agent: install release 0.2.0 (sha256:{A[:12]}…) from 2 mirror(s)"]
    assert plan.pending and plan.to_json()["action"] == "install"
    assert _plan(_base(), two, installed={A}).describe() == [
        f"agent: select release 0.2.0 (sha256:{A[:12]}…), installed already"
    ]
    off = _plan(_base(), two, self_update=False)
    assert off.describe() == ["agent: self_update is off: release 0.2.0 is not installed"]
    assert not off.pending
    assert _plan(_base(), two, min_version="0.3.0").describe() == [
        "agent: release 0.2.0 refused: below agent_min_version 0.3.0"
    ]
    failed = refused(_base(), hex_digest=A, version="0.2.0", at="t", why="imports 0.9")
    assert _plan(failed, two).describe() == [
        "agent: release 0.2.0 failed before and is not retried"
    ]
    # The hook takes the installer's place, whatever the switch and the pin say.
    due = _plan(failed, two, hook="due", self_update=False)
    assert due.describe() == ["agent: the agent-update hook will run for 0.2.0"] and due.pending
    assert _plan(_base(), two, hook="ran").to_json()["action"] == "hook-ran"
    assert _plan(_base(), _release("0.2.0", A, urls=())).to_json()["action"] == "no-urls"
    # HEAD approves the agent that runs, or approves none: nothing to say.
    same = _plan(_base(), _release(BASE, B))
    assert same.describe() == [] and same.action == "none" and not same.pending
    assert _plan(_base(), None).describe() == []


def test_plan_follows_the_start_gate_first() -> None:
    trial = selected_release(_base(), hex_digest=A, version="0.2.0", at="t1")
    trial = started(trial, at="t2")
    plan = _plan(trial, _release("0.2.0", A), installed={A})
    assert plan.describe() == [
        "agent: release 0.2.0 is on trial (1 of 3 starts used); its first converged pass "
        "marks it good"
    ]
    assert not plan.pending
    # Three starts used: the next start abandons it, and then HEAD's release has failed.
    spent = started(started(trial, at="t3"), at="t4")
    assert _plan(spent, _release("0.2.0", A), installed={A}).describe() == [
        f"agent: release 0.2.0 is abandoned at the next start: 3 starts in a row ended before "
        f"a converged cycle; the base install {BASE} runs instead",
        "agent: release 0.2.0 failed before and is not retried",
    ]
    # A good release runs; HEAD approving the base's version selects the base again.
    good = marked_good(trial, hex_digest=A, at="t5")
    back = _plan(good, _release(BASE, B), installed={A})
    assert back.describe() == [
        f"agent: select the base install {BASE} again; it runs at the next start"
    ]
    assert back.pending
    # Its environment gone: abandoned at the next start, the base runs HEAD's release.
    gone = _plan(good, _release("0.2.0", A), installed=set())
    assert gone.describe()[0].startswith("agent: release 0.2.0 is abandoned at the next start")


def test_plan_reads_the_agent_folder_and_warns_of_an_unpinned_runtime(tmp_path: Path) -> None:
    folder = AgentFolder.of(tmp_path)
    (folder.download_dir(A)).mkdir(parents=True)
    (folder.download_dir(A) / "r.whl").write_bytes(b"0123456789")
    wheel = {"version": "0.2.0", "digest": "sha256:" + A, "size": 10, "urls": ["agent/r.whl"]}
    pin = "sha256:" + "c" * 64
    updates = {"agent": wheel, "runtime": {"version": "2.0", "digest": pin}}
    plan = read_agent_plan(
        tmp_path,
        updates=updates,
        images={"llm": "r/llm@sha256:" + "d" * 64},
        self_update=True,
        min_version="",
        hook="absent",
    )
    assert plan.describe() == [
        f"agent: install release 0.2.0 (sha256:{A[:12]}…) from 1 mirror(s); "
        "1 of 1 wheel(s) downloaded already",
        f"runtime update: updates.runtime 2.0 ({pin[:19]}…) is not the image of any runtime (llm)",
    ]
    assert not folder.record_file.exists(), "plan wrote the agent record"


# ---- through the CLI, on a real node ---------------------------------------------------------


@pytest.fixture
def podman_url(podman_service: PodmanService) -> str:
    return podman_service.url


def _plan_json(node: NodeUnderTest, env: dict[str, str]) -> dict[str, Any]:
    agent = json.loads(node.run("plan", "--json", env=env).ok().stdout)["agent"]
    assert isinstance(agent, dict)
    return agent


@pytest.mark.podman
def test_reconcile_plan_says_what_the_pass_does_about_the_agent(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    tmp_path: Path,
    podman_url: str,
) -> None:
    data = b"not a wheel: plan never reads it"
    hex_digest = hashlib.sha256(data).hexdigest()
    file_server.write("agent/reconciler-0.2.0-py3-none-any.whl", data)
    body = snapshot_body()
    urls = ["agent/reconciler-0.2.0-py3-none-any.whl", f"{file_server.url}/mirror/r.whl"]
    agent = {"version": "0.2.0", "digest": f"sha256:{hex_digest}", "size": len(data), "urls": urls}
    body["updates"]["agent"] = agent
    simulator.publish(body=body)
    env = {
        "RECONCILER_PODMAN_URL": podman_url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(tmp_path / "hooks"),
    }
    node.run("fetch", env=env).ok()
    asked = file_server.stats.total_requests()

    text = node.run("plan", env=env).ok().stdout
    assert f"agent: install release 0.2.0 (sha256:{hex_digest[:12]}…) from 2 mirror(s)" in text
    assert "write runtime/updates.json" in text  # the node has not converged yet either
    shown = _plan_json(node, env)
    assert (shown["action"], shown["version"], shown["pending"]) == ("install", "0.2.0", True)

    pinned = _plan_json(node, {**env, "RECONCILER_AGENT_MIN_VERSION": "0.3.0"})
    assert pinned["lines"] == ["release 0.2.0 refused: below agent_min_version 0.3.0"]
    assert _plan_json(node, {**env, "RECONCILER_SELF_UPDATE": "false"})["action"] == "off"
    write_hook(tmp_path / "hooks", "agent-update", "exit 0")
    hooked = node.run("plan", env=env).ok().stdout
    assert "agent: the agent-update hook will run for 0.2.0" in hooked
    (tmp_path / "hooks" / "agent-update").unlink()

    # A release recorded as failed for this digest (as the installer records a refusal).
    folder = AgentFolder.of(node.state_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    failed = refused(AgentRecord(), hex_digest=hex_digest, version="0.2.0", at="t", why="x")
    folder.record_file.write_text(json.dumps(failed.to_json()))
    record_before = folder.record_file.read_bytes()
    text = node.run("plan", env=env).ok().stdout
    assert "agent: release 0.2.0 failed before and is not retried" in text
    assert "install release" not in text

    assert file_server.stats.total_requests() == asked, "plan contacted the origin or a mirror"
    assert folder.record_file.read_bytes() == record_before, "plan changed the agent record"
    assert not (folder.root / "downloads").exists() and not (folder.root / "releases").exists()
    # Converged, the plan has nothing left but the agent's line; a failed release is no change.
    assert node.run("once", env=env).exit_code == 0
    settled = node.run("plan", "--exit-code", env=env)
    assert settled.exit_code == 0, settled.stdout
    assert settled.stdout.splitlines()[1:] == [
        "  nothing to do",
        "  agent: release 0.2.0 failed before and is not retried",
    ]
    folder.record_file.unlink()  # forgotten: the install is due again, and counts as a change
    due = node.run("plan", "--exit-code", env=env)
    assert due.exit_code == 3
    assert due.stdout.splitlines()[1:] == [
        f"  agent: install release 0.2.0 (sha256:{hex_digest[:12]}…) from 2 mirror(s)"
    ]
