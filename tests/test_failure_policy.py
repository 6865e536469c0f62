"""The failure policy of docs/apply-order.md, row by row, with fake edges and no Podman.

The node is real: initialised and fed by the real ``reconcile`` command from a ``file://``
origin of signed snapshots, so HEAD, the commits, the receipts (signed by the node key) and the
node record are the product's own. The edges the transaction is given are fakes: a model store
that only remembers what it installed, a container runtime that keeps a dict of containers, a
hook runner that records each run and its environment, a fixed clock and a crash seam that
raises where ``RECONCILER_TEST_DIE_AT`` would SIGKILL. Each scripted failure is raised by the
fake edge exactly where the real one raises it.

Each row asserts: the outcome's result; whether a rollback commit was made; what is
quarantined; the hold; the receipts' results; which hooks ran, with which
``RECONCILE_RESULT``; and that what must stay unchanged (containers, runtime files, models)
did.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.crash import CRASH_POINTS
from reconciler.apply.edges import Edges, GcFreed
from reconciler.apply.transaction import converge_with, rollback_with
from reconciler.config.settings import load_settings
from reconciler.core.containerplan import Action, ContainerPlan, ObservedContainer
from reconciler.core.documents import ModelSpec
from reconciler.core.errors import (
    ContainerError,
    DiskSpaceError,
    DownloadError,
    HashMismatchError,
    PodmanUnavailableError,
    ReconcilerError,
    RegistryError,
    SnapshotFaultError,
)
from reconciler.core.outcome import ApplyResult, ConvergeOutcome
from reconciler.core.specs import ContainerSpec
from reconciler.history.node import Node
from reconciler.runtime.hooks import HookResult
from reconciler.runtime.podman import ActionOutcome
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.scenarios import forge_commit, head, receipts, runtime, snapshot_body
from tests.support.signing import Release, RepositorySimulator, base_snapshot

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, the fixed clock
IMAGE_1 = "127.0.0.1:5000/web@sha256:" + "1" * 64
IMAGE_2 = "127.0.0.1:5000/web@sha256:" + "2" * 64
IMAGE_3 = "127.0.0.1:5000/web@sha256:" + "3" * 64


# ---- fakes ----------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """The agent dies here (BaseException: nothing in the product may catch it)."""


class FakeModels:
    """A model store that installs instantly, unless ``failure`` is set."""

    def __init__(self) -> None:
        self.installed: set[str] = set()
        self.failure: ReconcilerError | None = None
        self.kept: list[set[str]] = []

    def not_installed(self, models: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]:
        return tuple(m for m in models if m.id not in self.installed)

    def installed_ids(self) -> list[str]:
        return sorted(self.installed)

    def bytes_needed(self, models: Sequence[ModelSpec]) -> int:
        return sum(f.size for m in models for f in m.files)

    def ensure(self, models: Sequence[ModelSpec], *, offline: bool) -> None:
        if self.failure is not None:
            raise self.failure
        missing = [m.id for m in models if m.id not in self.installed]
        if offline and missing:
            raise DownloadError(f"offline: {missing[0]} is not on disk")
        self.installed.update(missing)

    def remove(self, model_id: str) -> None:
        self.installed.discard(model_id)

    def gc(self, keep: set[str]) -> GcFreed:
        self.kept.append(keep)
        return GcFreed(removed_blobs=0, freed_bytes=0)

    def states(self, models: Sequence[ModelSpec]) -> list[dict[str, str | None]]:
        return [
            {"id": m.id, "state": "Active" if m.id in self.installed else "Pending", "reason": None}
            for m in models
        ]

    def verify(self) -> list[str]:
        return []


class FakeRuntime:
    """Containers in a dict. ``failures[(kind, image)]`` fails that action the way
    ``PodmanEdge.apply`` does: its outcome (not ok) is reported, then its error raised; with
    ``left_behind`` the container was made, in that state, before it failed (a container that
    exited at once, or that runs but failed its health gate)."""

    def __init__(self) -> None:
        self.containers: dict[str, ObservedContainer] = {}
        self.failures: dict[tuple[str, str], ReconcilerError] = {}
        self.left_behind: str | None = None  # the state a failed container is left in
        self.unreachable: ReconcilerError | None = None
        self.pulled: list[str] = []
        self._ids = 0

    def observe(self) -> list[ObservedContainer]:
        if self.unreachable is not None:
            raise self.unreachable
        return sorted(self.containers.values(), key=lambda c: c.name)

    def images(self) -> dict[str, str]:
        return {name: c.image for name, c in self.containers.items()}

    def apply(
        self,
        plan: ContainerPlan,
        desired: Sequence[ContainerSpec],
        /,
        *,
        allow_pull: bool,
        on_outcome: Callable[[ActionOutcome], None] | None,
    ) -> list[ActionOutcome]:
        if plan.conflicts:
            raise ContainerError("; ".join(c.describe() for c in plan.conflicts))
        specs = {spec.runtime: spec for spec in desired}
        outcomes = []
        for action in plan.actions:
            failure = self.failures.get((action.kind, action.image or action.container))
            if failure is not None:
                if self.left_behind is not None:
                    self._carry_out(action, specs, state=self.left_behind)
                failed = ActionOutcome(action=action, ok=False, message=failure.one_line())
                if on_outcome is not None:
                    on_outcome(failed)
                raise failure
            container_id = self._carry_out(action, specs, state="running")
            done = ActionOutcome(action=action, ok=True, message="ok", container_id=container_id)
            outcomes.append(done)
            if on_outcome is not None:
                on_outcome(done)
        return outcomes

    def _carry_out(self, action: Action, specs: Mapping[str, ContainerSpec], *, state: str) -> str:
        name = action.container
        if action.kind == "pull":
            self.pulled.append(action.image or "")
            return ""
        if action.kind == "remove":
            del self.containers[name]
            return action.container_id or ""
        if action.kind in ("create", "replace"):
            spec = specs[action.runtime]
            self._ids += 1
            self.containers[name] = ObservedContainer(
                id=f"{self._ids:064x}", name=name, state=state, labels=spec.labels, image=spec.image
            )
        elif action.kind == "start":
            old = self.containers[name]
            self.containers[name] = ObservedContainer(
                id=old.id, name=name, state=state, labels=old.labels, image=old.image
            )
        return self.containers[name].id


class FakeHooks:
    """Every hook is installed; ``exits[name]`` is its exit code (0 unless set, None: it
    timed out). Each run is recorded with its environment."""

    timeout_s = 5.0

    def __init__(self) -> None:
        self.exits: dict[str, int | None] = {}
        self.runs: list[tuple[str, dict[str, str]]] = []

    def run(self, name: str, *, env: Mapping[str, str]) -> HookResult:
        self.runs.append((name, dict(env)))
        code = self.exits.get(name, 0)
        said = "" if code == 0 else f"{name}: not now\n"
        if code is None:
            said += f"\n[killed after {self.timeout_s:g} s]"  # as run_hook reports a timeout
        return HookResult(name=name, ran=True, exit_code=code, output=said, timed_out=code is None)

    def seen(self) -> list[tuple[str, str | None]]:
        """(hook, RECONCILE_RESULT) of each run, in order; then forgotten."""
        seen = [(name, env.get("RECONCILE_RESULT")) for name, env in self.runs]
        self.runs.clear()
        return seen


class CrashAt:
    def __init__(self, point: str | None = None) -> None:
        self.point = point

    def __call__(self, point: str) -> None:
        if point == self.point:
            raise SimulatedCrash(point)


# ---- the scene ------------------------------------------------------------------------------


@dataclass
class Scene:
    agent: NodeUnderTest
    network: RepositorySimulator
    models: FakeModels = field(default_factory=FakeModels)
    runtime: FakeRuntime = field(default_factory=FakeRuntime)
    hooks: FakeHooks = field(default_factory=FakeHooks)
    crash: CrashAt = field(default_factory=CrashAt)

    def node(self) -> Node:
        return Node(load_settings(config=str(self.agent.config), environ=self.agent.env))

    def edges(self) -> Edges:
        return Edges(
            models=self.models,
            runtime=self.runtime,
            hooks=self.hooks,
            clock=lambda: NOW,
            crash=self.crash,
        )

    def publish(self, **fields: Any) -> Release:
        """Sign and publish a snapshot with these fields (the next serial), and fetch it."""
        release = self.network.publish(body=snapshot_body(**fields))
        self.agent.fetch().ok()
        return release

    def converge(self, **options: Any) -> ConvergeOutcome:
        return converge_with(self.node(), edges=self.edges(), offline=False, **options)

    def record(self) -> dict[str, Any]:
        return self.agent.record()

    def head(self) -> dict[str, str]:
        return head(self.agent)

    def results(self, commit: str) -> list[str]:
        return [r["result"] for r in receipts(self.agent, commit)] if self._noted(commit) else []

    def _noted(self, commit: str) -> bool:
        listing = self.agent.git("notes", "--ref=applied", "list").split()
        return commit in listing[1::2]

    def files(self) -> dict[str, bytes]:
        folder = self.agent.state_dir / "runtime"
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def view(self) -> tuple[dict[str, str], dict[str, bytes], list[str]]:
        """What runs: container images, runtime files, installed models."""
        return self.runtime.images(), self.files(), self.models.installed_ids()


def web(image: str, **more: Any) -> dict[str, Any]:
    return runtime("web", image, **more)


def tiny(version: str) -> dict[str, Any]:
    model = base_snapshot()["models"][0]
    return {**model, "version": version}


FIRST: dict[str, Any] = {"runtimes": [web(IMAGE_1)], "models": [tiny("v1")]}
SECOND: dict[str, Any] = {
    "runtimes": [web(IMAGE_2)],
    "models": [tiny("v2")],
    "jobs": {"max_tokens": 8192, "max_queue": 4, "timeout_s": 30},
    "participation": {"modes": ["testnet"], "subclouds": [{"id": "eu-large", "enabled": True}]},
}


@pytest.fixture
def scene(make_node: Callable[..., NodeUnderTest], tmp_path: Path) -> Scene:
    network = RepositorySimulator(folder=tmp_path / "origin")
    agent = make_node((tmp_path / "origin").as_uri(), network.roots[1])
    return Scene(agent=agent, network=network)


@pytest.fixture
def on_first(scene: Scene) -> Release:
    """Snapshot 1 published, fetched and converged; the hooks' record starts empty."""
    first = scene.publish(**FIRST)
    assert scene.converge().result is ApplyResult.CONVERGED
    scene.hooks.seen()
    return first


# ---- every step done ------------------------------------------------------------------------


def test_every_step_done_converges_and_signs_one_receipt(scene: Scene, on_first: Release) -> None:
    second = scene.publish(**SECOND)

    outcome = scene.converge()

    assert (outcome.result, outcome.converged, outcome.digest) == (
        ApplyResult.CONVERGED,
        True,
        second.digest,
    )
    assert scene.head()["Reason"] == "fetch"
    (receipt,) = receipts(scene.agent, scene.head()["commit"])
    assert receipt["result"] == "converged"
    assert receipt["participation"] == {
        "joined": ["eu-large"],
        "left": ["eu-small"],
        "subclouds": ["eu-large"],
    }
    assert [s["step"] for s in receipt["steps"]] == [
        "models",
        "images",
        "runtime-files",
        "containers",
        "prune",
        "participation",
    ]
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", "converged")]
    assert scene.runtime.images() == {"reconciler-web": IMAGE_2}
    assert scene.models.installed_ids() == ["tiny-llm:v2"]
    assert b"8192" in scene.files()["jobs.json"]
    record = scene.record()
    assert (record["applied_digest"], record["converged"], record["quarantined"]) == (
        second.digest,
        True,
        [],
    )
    assert record["hold"] is False
    assert record["apply_in_progress"] is None
    # Converged again: nothing to do, no hook, no receipt.
    assert scene.converge().result is ApplyResult.NOOP
    assert scene.hooks.seen() == []
    assert scene.results(scene.head()["commit"]) == ["converged"]


# ---- failures not caused by the snapshot ----------------------------------------------------


def _veto(scene: Scene) -> None:
    scene.hooks.exits["pre-apply"] = 3


def _veto_by_timeout(scene: Scene) -> None:
    scene.hooks.exits["pre-apply"] = None


def _pull_fails(scene: Scene) -> None:
    scene.runtime.failures[("pull", IMAGE_2)] = RegistryError("manifest unknown")


def _download_fails(scene: Scene) -> None:
    scene.models.failure = DownloadError("no mirror answered for tiny-llm:v2/config.json")


def _hash_mismatch(scene: Scene) -> None:
    scene.models.failure = HashMismatchError("config.json: sha256 mismatch")


def _disk_full(scene: Scene) -> None:
    scene.models.failure = DiskSpaceError("needs 3 bytes, 0 free above the reserve")


def _conflict(scene: Scene) -> None:
    foreign = ObservedContainer(id="f" * 64, name="reconciler-web", state="running")
    scene.runtime.containers["reconciler-web"] = foreign


@dataclass(frozen=True)
class Retried:
    """A row whose failure changes nothing running and is retried with nothing quarantined."""

    break_it: Callable[[Scene], None]
    result: ApplyResult
    error_kind: str
    counted: bool
    message: str


RETRIED = {
    "veto": Retried(_veto, ApplyResult.VETOED, "veto", False, "(exit 3): pre-apply: not now"),
    "veto-timeout": Retried(
        _veto_by_timeout, ApplyResult.VETOED, "veto", False, "(timed out after 5 s): pre-apply: not"
    ),
    "pull-failure": Retried(_pull_fails, ApplyResult.FAILED, "apply", True, "manifest unknown"),
    "model-download": Retried(
        _download_fails, ApplyResult.FAILED, "apply", True, "no mirror answered"
    ),
    "model-hash": Retried(_hash_mismatch, ApplyResult.FAILED, "apply", True, "sha256 mismatch"),
    "model-disk-full": Retried(_disk_full, ApplyResult.FAILED, "apply", True, "0 free"),
}


@pytest.mark.parametrize("row", RETRIED.values(), ids=RETRIED.keys())
def test_a_failure_not_caused_by_the_snapshot_changes_nothing_running_and_is_retried(
    scene: Scene, on_first: Release, row: Retried
) -> None:
    second = scene.publish(**SECOND)
    before = scene.view()
    failures = scene.record()["counters"].get("apply_failures", 0)
    row.break_it(scene)

    outcome = scene.converge()

    assert (outcome.result, outcome.converged) == (row.result, False)
    assert row.message in outcome.message
    commit = scene.head()["commit"]
    assert scene.head()["Reason"] == "fetch"  # no rollback commit
    (receipt,) = receipts(scene.agent, commit)
    assert receipt["result"] == row.result.value
    assert row.message in receipt["error"]
    # Nobody joined or left: the node still serves what it served.
    assert (receipt["participation"]["joined"], receipt["participation"]["left"]) == ([], [])
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", row.result.value)]
    record = scene.record()
    assert record["quarantined"] == []
    assert record["hold"] is False
    assert record["converged"] is False
    assert record["applied_digest"] == on_first.digest
    assert record["last_error"]["kind"] == row.error_kind
    assert record["counters"].get("apply_failures", 0) == failures + row.counted
    assert record["apply_in_progress"] is None
    # Models and images are fetched before any runtime file: nothing running changed, and
    # the models of snapshot 1 are all still there (maybe next to those fetched already).
    images, files, models = scene.view()
    assert (images, files) == before[:2]
    assert set(before[2]) <= set(models)

    # The next pass tries the same HEAD again.
    scene.hooks.exits.clear()
    scene.models.failure = None
    scene.runtime.failures.clear()
    again = scene.converge()
    assert (again.result, again.digest) == (ApplyResult.CONVERGED, second.digest)
    assert scene.results(commit) == [row.result.value, "converged"]
    assert scene.runtime.images() == {"reconciler-web": IMAGE_2}


def test_podman_unreachable_fails_before_any_attempt(scene: Scene, on_first: Release) -> None:
    scene.publish(**SECOND)
    scene.runtime.unreachable = PodmanUnavailableError("Podman at unix:///x unreachable")

    outcome = scene.converge()

    assert (outcome.result, outcome.converged) == (ApplyResult.FAILED, False)
    assert scene.hooks.seen() == []  # step 2 failed: no attempt, so no hook and no receipt
    assert scene.results(scene.head()["commit"]) == []
    record = scene.record()
    assert (record["converged"], record["quarantined"], record["last_error"]["kind"]) == (
        False,
        [],
        "apply",
    )


def test_a_conflicting_container_is_refused_before_anything_changes(
    scene: Scene, on_first: Release
) -> None:
    scene.publish(**SECOND)
    _conflict(scene)
    before = scene.view()

    outcome = scene.converge()

    assert outcome.result is ApplyResult.FAILED
    assert "without the managed label" in outcome.message
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", "failed")]
    assert scene.record()["quarantined"] == []
    assert scene.view()[:2] == before[:2]
    assert scene.models.installed_ids() == ["tiny-llm:v1", "tiny-llm:v2"]  # fetched first


def test_offline_with_a_model_missing_fails_and_downloads_nothing(
    scene: Scene, on_first: Release
) -> None:
    scene.publish(**SECOND)
    before = scene.view()

    outcome = converge_with(scene.node(), edges=scene.edges(), offline=True)

    assert outcome.result is ApplyResult.FAILED
    assert "offline: tiny-llm:v2 is not on disk" in outcome.message
    assert scene.view() == before
    assert scene.record()["quarantined"] == []


# ---- the snapshot's fault -------------------------------------------------------------------


def _start_fails(scene: Scene, kind: str = "replace", image: str = IMAGE_2) -> None:
    scene.runtime.failures[(kind, image)] = SnapshotFaultError("web exited with code 1")
    scene.runtime.left_behind = "exited"


def _health_fails(scene: Scene) -> None:
    scene.runtime.failures[("replace", IMAGE_2)] = SnapshotFaultError(
        "web failed its health check 1 time(s)"
    )
    scene.runtime.left_behind = "running"


FAULTS = {"start-failure": _start_fails, "health-failure": _health_fails}


@pytest.mark.parametrize("break_it", FAULTS.values(), ids=FAULTS.keys())
def test_a_snapshot_that_fails_is_rolled_back_and_quarantined_without_a_hold(
    scene: Scene, on_first: Release, break_it: Callable[[Scene], None]
) -> None:
    second = scene.publish(**SECOND)
    bad_commit = scene.head()["commit"]
    break_it(scene)

    outcome = scene.converge()

    assert (outcome.result, outcome.converged, outcome.digest) == (
        ApplyResult.ROLLED_BACK,
        False,
        second.digest,
    )
    assert f"rolled back to {on_first.digest[:19]}…" in outcome.message
    assert scene.results(bad_commit) == ["rolled-back"]
    back = scene.head()
    assert back["Reason"] == "rollback"  # a new commit of snapshot 1
    assert back["commit"] != bad_commit
    assert scene.results(back["commit"]) == ["converged"]
    assert scene.hooks.seen() == [
        ("pre-apply", None),
        ("post-apply", "rolled-back"),
        ("pre-apply", None),
        ("post-apply", "converged"),
    ]
    assert scene.runtime.images() == {"reconciler-web": IMAGE_1}
    assert scene.models.installed_ids() == ["tiny-llm:v1"]
    record = scene.record()
    assert record["quarantined"] == [second.digest]
    assert record["hold"] is False  # an automatic rollback does not hold
    assert (record["applied_digest"], record["converged"]) == (on_first.digest, True)
    assert record["last_error"]["kind"] == "snapshot"  # why it rolled back stays visible
    assert record["counters"]["apply_failures"] == 1
    assert record["counters"]["rollbacks"] == 1
    # A quarantined snapshot is not fetched back to HEAD; a higher serial is applied.
    scene.agent.fetch().ok()
    assert scene.converge().result is ApplyResult.NOOP
    third = scene.publish(runtimes=[web(IMAGE_3)], models=[tiny("v3")])
    scene.runtime.failures.clear()
    assert scene.converge().digest == third.digest
    assert scene.runtime.images() == {"reconciler-web": IMAGE_3}


def test_the_pre_apply_hook_sees_why_an_apply_runs(scene: Scene, on_first: Release) -> None:
    scene.publish(**SECOND)
    _start_fails(scene)

    scene.converge()

    reasons = [env["RECONCILE_REASON"] for name, env in scene.hooks.runs if name == "pre-apply"]
    previous = [env["RECONCILE_PREVIOUS_DIGEST"] for name, env in scene.hooks.runs][:1]
    assert reasons == ["fetch", "rollback"]
    assert previous == [on_first.digest]


def test_a_rollback_that_fails_too_is_not_rolled_back_again(
    scene: Scene, on_first: Release
) -> None:
    second = scene.publish(**SECOND)
    _start_fails(scene)
    _start_fails(scene, image=IMAGE_1)  # and snapshot 1's container will not start either

    outcome = scene.converge()

    assert outcome.result is ApplyResult.ROLLED_BACK
    back = scene.head()
    assert back["Reason"] == "rollback"
    assert scene.results(back["commit"]) == ["failed"]  # no loop: one rollback, it failed
    assert scene.hooks.seen() == [
        ("pre-apply", None),
        ("post-apply", "rolled-back"),
        ("pre-apply", None),
        ("post-apply", "failed"),
    ]
    record = scene.record()
    # The rollback target ran before: its failure is the node's, retried, never quarantined.
    assert record["quarantined"] == [second.digest]
    assert record["hold"] is False
    assert record["converged"] is False
    scene.runtime.failures.clear()
    assert scene.converge().result is ApplyResult.CONVERGED
    assert scene.results(back["commit"]) == ["failed", "converged"]


def test_a_failing_repair_of_the_converged_snapshot_is_not_quarantined(
    scene: Scene, on_first: Release
) -> None:
    del scene.runtime.containers["reconciler-web"]  # drift: someone removed it
    scene.runtime.failures[("create", IMAGE_1)] = SnapshotFaultError("web exited with code 1")

    outcome = scene.converge()

    assert outcome.result is ApplyResult.FAILED
    assert "quarantined" not in outcome.message
    assert scene.head()["Reason"] == "fetch"  # no rollback commit
    assert scene.results(scene.head()["commit"]) == ["converged", "failed"]
    assert [env["RECONCILE_REASON"] for _, env in scene.hooks.runs] == ["repair", "repair"]
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", "failed")]
    record = scene.record()
    assert (record["quarantined"], record["hold"], record["last_error"]["kind"]) == (
        [],
        False,
        "apply",
    )


def test_a_first_snapshot_that_fails_is_quarantined_skipped_then_superseded(
    scene: Scene,
) -> None:
    bad = scene.publish(**FIRST)
    _start_fails(scene, kind="create", image=IMAGE_1)

    outcome = scene.converge()

    assert (outcome.result, outcome.converged) == (ApplyResult.FAILED, False)
    assert outcome.message.endswith(f"(quarantined {bad.digest[:19]}…)")
    assert scene.head()["Reason"] == "fetch"  # nothing to roll back to
    assert scene.results(scene.head()["commit"]) == ["failed"]
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", "failed")]
    assert scene.record()["quarantined"] == [bad.digest]
    # The quarantined HEAD is skipped: no hook, no receipt, nothing observed.
    skipped = scene.converge()
    assert (skipped.result, skipped.digest) == (ApplyResult.QUARANTINED, bad.digest)
    assert scene.hooks.seen() == []
    assert scene.results(scene.head()["commit"]) == ["failed"]
    # A higher serial is applied normally.
    scene.runtime.failures.clear()
    good = scene.publish(runtimes=[web(IMAGE_2)], models=[tiny("v2")])
    assert (scene.converge().result, scene.record()["applied_digest"]) == (
        ApplyResult.CONVERGED,
        good.digest,
    )
    assert scene.record()["quarantined"] == [bad.digest]


def test_an_unsafe_definition_is_refused_before_any_attempt_and_rolled_back(
    scene: Scene, on_first: Release
) -> None:
    # Valid by the schema, refused when it becomes a container: models mounted over the
    # runtime folder.
    unsafe = web(IMAGE_2, model_mount="/run/reconciler/models", models=["tiny-llm:v2"])
    bad = scene.publish(runtimes=[unsafe], models=[tiny("v2")])
    bad_commit = scene.head()["commit"]

    outcome = scene.converge()

    assert outcome.result is ApplyResult.ROLLED_BACK
    assert "inside /run/reconciler" in outcome.message
    (refused,) = receipts(scene.agent, bad_commit)
    assert (refused["result"], refused["actions"], "hooks" in refused) == ("rolled-back", [], False)
    assert scene.head()["Reason"] == "rollback"
    # The rollback's own converge found the node on snapshot 1 already: no hook ran; it
    # signs that the node is converged (on the rollback commit).
    assert scene.hooks.seen() == []
    (settled,) = receipts(scene.agent, scene.head()["commit"])
    assert (settled["result"], [s["step"] for s in settled["steps"]]) == ("converged", ["settled"])
    record = scene.record()
    assert (record["quarantined"], record["hold"], record["applied_digest"]) == (
        [bad.digest],
        False,
        on_first.digest,
    )
    assert scene.runtime.images() == {"reconciler-web": IMAGE_1}


# ---- HEAD fails re-verification -------------------------------------------------------------


def test_a_head_that_fails_reverification_is_never_applied(scene: Scene, on_first: Release) -> None:
    good = scene.head()["commit"]
    envelope = json.loads(on_first.snapshot)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["runtimes"] = [web(IMAGE_3)]
    forged = scene.network.sign(
        "application/vnd.resultity.snapshot+json", json.dumps(payload).encode(), ["mallory"]
    )
    bad = forge_commit(scene.agent, like=good, envelope=forged)
    scene.agent.git("reset", "--hard", bad)
    before = scene.view()

    outcome = scene.converge()

    assert (outcome.result, outcome.converged) == (ApplyResult.FAILED, False)
    assert f"HEAD {bad[:12]} fails verification" in outcome.message
    assert scene.hooks.seen() == []
    assert scene.results(bad) == []
    assert scene.view() == before
    record = scene.record()
    assert record["converged"] is False
    assert record["quarantined"] == []
    assert record["hold"] is True  # HEAD moved with stock git
    assert f"rejected HEAD commit {bad[:12]}" in record["last_error"]["message"]


# ---- the agent is killed --------------------------------------------------------------------


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_is_recorded_by_the_next_pass_which_converges(
    scene: Scene, on_first: Release, point: str
) -> None:
    second = scene.publish(**SECOND)
    commit = scene.head()["commit"]
    scene.crash.point = point

    with pytest.raises(SimulatedCrash):
        scene.converge()

    marker = scene.record()["apply_in_progress"]
    assert (marker["digest"], marker["reason"]) == (second.digest, "fetch")
    assert scene.results(commit) == []
    died_in_record = point == "before-receipt"
    assert scene.hooks.seen()[-1] == (
        ("post-apply", "converged") if died_in_record else ("pre-apply", None)
    )
    scene.crash.point = None

    outcome = scene.converge()

    assert outcome.converged is True
    first, *rest = receipts(scene.agent, commit)
    assert first["started_at"] == marker["started_at"]
    if died_in_record:
        assert (first["result"], rest) == ("converged", [])
        assert "before writing this receipt" in first["note"]
        assert outcome.result is ApplyResult.NOOP
    else:
        assert first["result"] == "interrupted"
        assert "interrupted" in first["error"]
        assert [r["result"] for r in rest] == ["converged"]
    record = scene.record()
    assert (record["apply_in_progress"], record["applied_digest"], record["quarantined"]) == (
        None,
        second.digest,
        [],
    )
    assert scene.runtime.images() == {"reconciler-web": IMAGE_2}


# ---- hold -----------------------------------------------------------------------------------


def test_a_manual_rollback_holds_and_lifts_its_targets_quarantine(
    scene: Scene, on_first: Release
) -> None:
    second = scene.publish(**SECOND)
    assert scene.converge().result is ApplyResult.CONVERGED
    scene.hooks.seen()

    outcome = rollback_with(
        scene.node(),
        on_first.digest,
        edges=scene.edges(),
        reason="rollback",
        manual=True,
        offline=False,
    )

    assert (outcome.result, outcome.digest) == (ApplyResult.CONVERGED, on_first.digest)
    assert scene.head()["Reason"] == "rollback"
    assert scene.results(scene.head()["commit"]) == ["converged"]
    assert scene.hooks.seen() == [("pre-apply", None), ("post-apply", "converged")]
    record = scene.record()
    assert record["hold"] is True
    assert record["hold_reason"] == f"rollback to {on_first.digest[:19]}…"
    assert record["quarantined"] == []
    assert scene.runtime.images() == {"reconciler-web": IMAGE_1}
    # Held: a newer snapshot is stored but HEAD does not move to it.
    scene.publish(runtimes=[web(IMAGE_3)], models=[tiny("v3")])
    assert scene.record()["waiting"] != []
    assert scene.converge().result is ApplyResult.NOOP
    assert scene.record()["applied_digest"] == on_first.digest
    assert second.digest not in scene.record()["quarantined"]
