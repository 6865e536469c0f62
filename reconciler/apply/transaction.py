"""Converge the node to HEAD as one transaction: all of it, or back to what ran before.

Where it sits: called by ``agent`` (once / watch) and by ``rollback`` / ``resume`` with the
agent lock held. It composes the pure core (desired, plan, participation) with the edges
(history, containers, modelstore, hooks, receipts) in one documented order
(docs/apply-order.md):

 0. clean up after a crash: leftover temporaries, and a receipt for an attempt that died
    (``interrupted``); a HEAD moved with git becomes a hold;
 1. skip a quarantined HEAD the node is not running; re-verify HEAD's commit against the root
    that accepted it (an unverified tree is never applied) and compute the desired state;
 2. observe Podman and the model store, plan; a converged node stops here (no hook, no model
    byte read; a receipt only if convergence is news after a crash);
 3. ``pre-apply`` hook (a veto changes nothing);
 4. fetch everything needed while nothing running is touched: model blobs (space checked
    first) and trees, then the images (a plan with conflicts is refused here);
 5. runtime files (``jobs.json``, ``participation.json``, ``env``, …) written atomically, so
    new containers start with them;
 6. containers by their strategy, each gated on health; runtimes whose ``jobs.json`` changed
    are notified (restart or signal);
 7. prune: model trees HEAD no longer has, blobs outside the retention window;
 8. record: node record, ``agent-update`` hook (once per approved release), ``post-apply``
    hook, the signed receipt (with every hook's output), model states.

Failure policy (contract §5): a ``SnapshotFaultError`` (the snapshot's own fault: a container
that will not start or stay healthy, an unsafe definition) rolls back to the last converged
snapshot as a ``Reason: rollback`` commit and quarantines the digest; anything else is recorded
and retried on the next pass with nothing quarantined. A rollback that itself fails is not
rolled back again (no apply/rollback loops), and the snapshot the node already converged on is
never quarantined (its failure is retried).

``RECONCILER_TEST_DIE_AT=<point>`` (``CRASH_POINTS``) is a test seam: the agent SIGKILLs
itself at that step boundary (tests/test_crash.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.core.containerplan import Plan, plan
from reconciler.core.documents import ModelSpec, Snapshot, format_time, loads_strict
from reconciler.core.errors import (
    HistoryError,
    HookVetoError,
    ReconcilerError,
    RejectedError,
    SnapshotFaultError,
    TransientError,
)
from reconciler.core.participation import ParticipationView, participation, runtime_files
from reconciler.core.specs import ContainerSpec, container_specs
from reconciler.core.trust import reverify_snapshot
from reconciler.disk.atomic import write_atomic
from reconciler.history.node import Node
from reconciler.history.receipts import receipt_line
from reconciler.models.store import ModelStore
from reconciler.runtime.hooks import HookResult, run_hook
from reconciler.runtime.podman import ActionOutcome, PodmanEdge

__all__ = ["ConvergeOutcome", "Desired", "NodePlan", "compute_plan", "converge", "rollback_to"]

log = logging.getLogger("reconciler")

# Files under runtime/ whose change the runtime is told about (contract §2: notify).
NOTIFYING_FILES = ("jobs.json", "participation.json")
_HISTORY_KEPT = 50  # applied digests remembered in the node record
_FETCH_ERROR_KINDS = frozenset({"rejected", "unreachable"})  # recorded by intake


@dataclass(frozen=True)
class Desired:
    commit: str
    digest: str
    serial: int
    reason: str  # the commit's Reason trailer
    snapshot: Snapshot
    containers: tuple[ContainerSpec, ...]
    view: ParticipationView
    files: dict[str, bytes]


@dataclass(frozen=True)
class NodePlan:
    """Everything converging to ``desired`` would do; ``empty`` means converged."""

    desired: Desired
    containers: Plan
    models_to_install: tuple[ModelSpec, ...]
    download_bytes: int
    trees_to_remove: tuple[str, ...]
    files_changed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return (
            self.containers.empty
            and not self.models_to_install
            and not self.trees_to_remove
            and not self.files_changed
        )

    def describe(self) -> list[str]:
        lines = [f"install model {m.id}" for m in self.models_to_install]
        if self.download_bytes:
            lines.append(f"download {self.download_bytes} bytes of model files")
        lines += [f"write runtime/{name}" for name in self.files_changed]
        lines += self.containers.describe()
        lines += [f"remove model {model_id}" for model_id in self.trees_to_remove]
        return lines

    def to_json(self) -> dict[str, Any]:
        d = self.desired
        return {
            "config_digest": d.digest,
            "serial": d.serial,
            "commit": d.commit,
            "empty": self.empty,
            "containers": self.containers.to_json(),
            "models": {
                "install": [m.id for m in self.models_to_install],
                "download_bytes": self.download_bytes,
                "remove": list(self.trees_to_remove),
            },
            "runtime_files": list(self.files_changed),
            "participation": {"subclouds": list(d.view.subclouds), "modes": list(d.view.modes)},
        }


@dataclass(frozen=True)
class ConvergeOutcome:
    converged: bool
    result: str  # converged | failed | rolled-back | vetoed | noop | nothing
    message: str
    digest: str | None = None
    duration_s: float = 0.0
    actions: tuple[str, ...] = field(default=())


# ---- desired state ------------------------------------------------------------------------


def load_desired(node: Node, oid: str) -> Desired:
    """Re-verify a commit and compute what the node must look like (RejectedError if bad)."""
    info = node.history.info(oid)
    payload, envelope = node.history.blobs(oid)
    root = node.roots.version(info.root_version).root
    verified = reverify_snapshot(
        root,
        envelope_bytes=envelope,
        payload_bytes=payload,
        digest=info.digest,
        network=node.network,
    )
    snapshot = verified.snapshot
    view = participation(
        snapshot, vram_mib=node.settings.vram_mib, opt_out=node.settings.opt_out_subclouds
    )
    return Desired(
        commit=oid,
        digest=info.digest,
        serial=info.serial,
        reason=info.reason,
        snapshot=snapshot,
        containers=tuple(container_specs(snapshot, config_digest=info.digest, paths=node.paths)),
        view=view,
        files=runtime_files(snapshot, config_digest=info.digest, view=view),
    )


def _changed_files(runtime_dir: Path, files: dict[str, bytes]) -> tuple[str, ...]:
    changed = []
    for name, data in sorted(files.items()):
        try:
            if (runtime_dir / name).read_bytes() == data:
                continue
        except OSError:
            pass
        changed.append(name)
    return tuple(changed)


def compute_plan(node: Node, desired: Desired, *, edge: PodmanEdge, store: ModelStore) -> NodePlan:
    files_changed = _changed_files(node.paths.runtime, desired.files)
    existed = (node.paths.runtime / "jobs.json").exists()
    notify = (
        frozenset(spec.runtime for spec in desired.containers)
        if existed and any(n in files_changed for n in NOTIFYING_FILES)
        else frozenset()
    )
    containers = plan(desired.containers, edge.observe(), notify_runtimes=notify)
    models = desired.snapshot.models
    to_install = tuple(m for m in models if not store.is_installed(m))
    wanted = {m.id for m in models}
    to_remove = tuple(
        sorted(i.model_id for i in store.installed_models() if i.model_id not in wanted)
    )
    return NodePlan(
        desired=desired,
        containers=containers,
        models_to_install=to_install,
        download_bytes=store.bytes_needed(to_install) if to_install else 0,
        trees_to_remove=to_remove,
        files_changed=files_changed,
    )


def open_edge(node: Node) -> PodmanEdge:
    settings = node.settings
    return PodmanEdge(settings.effective_podman_url, registry_auth_file=settings.registry_auth_file)


# ---- the transaction ------------------------------------------------------------------------


CRASH_POINTS = (
    "after-pre-apply",
    "after-models",
    "after-images",
    "after-runtime-files",
    "mid-containers",
    "after-containers",
    "after-prune",
    "before-receipt",
)
_CRASH_ENV = "RECONCILER_TEST_DIE_AT"


def _crash_point(name: str) -> None:
    """Die here, as a power cut would, when tests/test_crash.py asks for it; otherwise nothing.

    ``RECONCILER_TEST_DIE_AT=<name>`` (one of ``CRASH_POINTS``) is a test seam, not a setting:
    SIGKILL runs no cleanup, so what the next pass finds is what a real crash leaves.
    """
    if os.environ.get(_CRASH_ENV) == name:
        log.warning("%s=%s: killing this process", _CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


def _hook_env(node: Node, desired: Desired, *, reason: str, plan_file: Path) -> dict[str, str]:
    return {
        "RECONCILE_CONFIG_DIGEST": desired.digest,
        "RECONCILE_PREVIOUS_DIGEST": node.state.applied_digest or "",
        "RECONCILE_SERIAL": str(desired.serial),
        "RECONCILE_REASON": reason,
        "RECONCILE_PLAN": str(plan_file),
        "RECONCILE_STATE_DIR": str(node.paths.state_dir),
        "RECONCILE_PODMAN_URL": node.settings.effective_podman_url,
    }


def _tree_digest(model: ModelSpec) -> str:
    lines = "".join(f"{f.path}\0{f.digest}\n" for f in sorted(model.files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(lines.encode("utf-8")).hexdigest()


class _Attempt:
    """What one apply attempt did, for its receipt."""

    def __init__(self, node: Node, desired: Desired, *, reason: str) -> None:
        self.node = node
        self.desired = desired
        self.reason = reason
        self.started = time.time()
        self.outcomes: list[ActionOutcome] = []
        self.steps: list[dict[str, Any]] = []
        self.hooks: list[HookResult] = []
        self.changed = False  # whether anything on the running node was touched

    def step(self, name: str, detail: str) -> None:
        log.info("apply %s: %s", name, detail)
        self.steps.append({"step": name, "detail": detail, "at": format_time(time.time())})

    def receipt(
        self,
        *,
        result: str,
        error: str | None,
        containers: Sequence[dict[str, Any]],
        joined: Sequence[str],
        left: Sequence[str],
    ) -> dict[str, Any]:
        snapshot = self.desired.snapshot
        return {
            "config_digest": self.desired.digest,
            "serial": self.desired.serial,
            "commit": self.desired.commit,
            "result": result,
            "reason": self.reason,
            "started_at": format_time(self.started),
            "finished_at": format_time(time.time()),
            "agent_version": __version__,
            "steps": self.steps,
            "actions": [o.to_json() for o in self.outcomes],
            "containers": list(containers),
            "models": {m.id: _tree_digest(m) for m in snapshot.models},
            "participation": {
                "joined": list(joined),
                "left": list(left),
                "subclouds": list(self.desired.view.subclouds),
            },
            "hooks": [h.to_json() for h in self.hooks],
            "error": error,
        }


def _previous_subclouds(node: Node) -> list[str]:
    try:
        data = json.loads((node.paths.runtime / "participation.json").read_bytes())
        return [str(s) for s in data.get("subclouds", [])]
    except (OSError, ValueError, AttributeError):
        return []


def _observed_view(edge: PodmanEdge) -> list[dict[str, Any]]:
    try:
        return [
            {
                "name": c.name,
                "id": c.id,
                "state": c.state,
                "image": c.image,
                "image_id": c.image_id,
                "spec": c.spec_hash,
            }
            for c in edge.observe()
        ]
    except ReconcilerError:
        return []


def _keep_digests(node: Node, desired: Desired) -> set[str]:
    """Blobs that garbage collection must keep: HEAD's and the last K applied snapshots'."""
    keep = {f.digest for m in desired.snapshot.models for f in m.files}
    recent = [d for d in node.state.applied_history if d != desired.digest]
    for digest in recent[-node.settings.keep_applied :] if node.settings.keep_applied else []:
        oid = node.history.snapshot_ref(digest)
        if oid is None:
            continue
        try:
            payload, _ = node.history.blobs(oid)
            obj = loads_strict(payload)
            keep.update(f["digest"] for m in obj.get("models", []) for f in m.get("files", []))
        except (HistoryError, ValueError, AttributeError, TypeError):
            continue
    return keep


def _write_model_states(node: Node, store: ModelStore, desired: Desired) -> None:
    states = store.states(desired.snapshot.models)
    payload = {
        "config_digest": desired.digest,
        "models": [{"id": s.model_id, "state": s.state.value, "reason": s.reason} for s in states],
    }
    write_atomic(
        node.paths.state_dir / "model-states.json",
        (json.dumps(payload, indent=2) + "\n").encode("utf-8"),
    )


def _record_interrupted(node: Node) -> None:
    """A previous attempt died mid-apply (SIGKILL, power): say so in a receipt, once."""
    marker = node.state.apply_in_progress
    if not marker:
        return
    oid = marker.get("commit")
    state = node.state
    # The attempt got as far as recording convergence and died before its receipt: say
    # what happened (it converged), not that it was cut short.
    finished = state.converged and state.applied_digest == marker.get("digest")
    if oid:
        payload = {
            "config_digest": marker.get("digest"),
            "serial": marker.get("serial"),
            "commit": oid,
            "result": "converged" if finished else "interrupted",
            "reason": marker.get("reason"),
            "started_at": marker.get("started_at"),
            "finished_at": format_time(time.time()),
            "agent_version": __version__,
            "error": None
            if finished
            else "interrupted: the agent stopped during this apply; the next pass resumed it",
            "actions": [],
        }
        if finished:
            payload["note"] = "the agent stopped after converging, before writing this receipt"
        try:
            node.history.append_note(oid, receipt_line(payload, node_key=node.paths.node_key))
        except ReconcilerError as exc:
            log.warning("cannot record the interrupted apply: %s", exc.one_line())
    node.save(replace(node.state, apply_in_progress=None))


def _sweep_temporaries(node: Node) -> None:
    """Remove files ``write_atomic`` left behind when a process died between write and rename.

    Only with the agent lock held (every caller of ``converge`` has it): no other writer can be
    mid-write then. The model store cleans its own scratch folders (``gc``); its index is
    written the same way, in ``models/``.
    """
    folders = (
        node.paths.state_dir,
        node.paths.runtime,
        node.paths.work,
        node.paths.models,
        node.paths.state_dir / "roots",
    )
    for folder in folders:
        for leftover in folder.glob(".*.tmp") if folder.is_dir() else ():
            log.info("removing %s (left by an interrupted write)", leftover)
            leftover.unlink(missing_ok=True)
    if node.paths.repo.is_dir():
        for leftover in node.history.discard_interrupted_writes():
            log.info("removed %s (left by an interrupted git write)", leftover)


def _quarantined_head(node: Node, head: str) -> ConvergeOutcome | None:
    """HEAD names a quarantined snapshot the node is not running: do not apply it again.

    This is the case after a first snapshot failed with nothing to roll back to; it waits for
    a higher serial or ``reconcile resume`` (contract §5).
    """
    try:
        info = node.history.info(head)
    except HistoryError:
        return None  # load_desired reports it
    if info.digest not in node.state.quarantined or info.digest == node.state.applied_digest:
        return None
    return ConvergeOutcome(
        False,
        "quarantined",
        f"HEAD serial {info.serial} ({info.digest}) is quarantined: not applied again until a "
        "higher serial arrives or `reconcile resume`",
        info.digest,
    )


def converge(
    node: Node,
    *,
    offline: bool,
    full_verify: bool = False,
    reason: str | None = None,
    allow_rollback: bool = True,
) -> ConvergeOutcome:
    """Make the node match HEAD (module docstring: order and failure policy)."""
    started = time.monotonic()
    from reconciler.intake.fetch import note_moved_head

    note_moved_head(node)
    _record_interrupted(node)
    _sweep_temporaries(node)
    head = node.history.head_oid()
    if head is None:
        return ConvergeOutcome(False, "nothing", "no snapshot yet: run `reconcile fetch`")
    held_back = _quarantined_head(node, head)
    if held_back is not None:
        return held_back
    try:
        desired = load_desired(node, head)
    except RejectedError as exc:
        # Never applied; and whatever runs is not what HEAD names, so not converged.
        node.record_error("apply", RejectedError(f"HEAD commit {head[:12]}", exc.reason))
        node.save(replace(node.state, converged=False))
        return ConvergeOutcome(
            False, "failed", f"HEAD {head[:12]} fails verification: {exc.reason}"
        )
    except SnapshotFaultError as exc:
        # Refused before any change (an unsafe definition): quarantine, go back.
        info = node.history.info(head)
        return _fault(
            node,
            info.digest,
            info.serial,
            exc,
            started=started,
            allow_rollback=allow_rollback,
            offline=offline,
            receipt_commit=head,
        )
    reason = reason or ("repair" if node.state.applied_digest == desired.digest else desired.reason)
    store = ModelStore(node.paths)
    try:
        if full_verify:
            bad = store.verify_all(repair=True)
            for item in bad:
                log.warning("verify: %s", item.one_line())
        with open_edge(node) as edge:
            node_plan = compute_plan(node, desired, edge=edge, store=store)
            if node_plan.empty:
                return _settled(node, store, desired, started=started, edge=edge, reason=reason)
            return _apply(
                node,
                node_plan,
                edge=edge,
                store=store,
                offline=offline,
                reason=reason,
                started=started,
                allow_rollback=allow_rollback,
            )
    except TransientError as exc:
        node.record_error("apply", exc)
        node.save(replace(node.state, converged=False))
        return ConvergeOutcome(
            False, "failed", exc.one_line(), desired.digest, time.monotonic() - started
        )


def _settled(
    node: Node,
    store: ModelStore,
    desired: Desired,
    *,
    started: float,
    edge: PodmanEdge,
    reason: str,
) -> ConvergeOutcome:
    """Nothing to do. Record convergence if this is news (e.g. after a crash mid-record)."""
    state = node.state
    if not (state.converged and state.applied_digest == desired.digest):
        # An interrupted pass made every change (Podman finished what it was asked) but
        # never said so: this pass is the one that finds the node on HEAD, so it signs the
        # receipt; otherwise the audit trail would never show this snapshot converged.
        attempt = _Attempt(node, desired, reason=reason)
        attempt.step("settled", "nothing left to do: an earlier pass had made every change")
        payload = attempt.receipt(
            result="converged", error=None, containers=_observed_view(edge), joined=[], left=[]
        )
        try:
            node.history.append_note(
                desired.commit, receipt_line(payload, node_key=node.paths.node_key)
            )
        except ReconcilerError as exc:
            log.error("receipt not written: %s", exc.one_line())
        _mark_applied(node, desired)
        _write_model_states(node, store, desired)
    elif state.last_error is not None and state.last_error.kind == "apply":
        node.save(state.with_error(None))
    # An agent-update hook installed after the apply that approved the release runs now.
    _agent_update(
        node,
        desired,
        env={
            "RECONCILE_CONFIG_DIGEST": desired.digest,
            "RECONCILE_SERIAL": str(desired.serial),
            "RECONCILE_STATE_DIR": str(node.paths.state_dir),
        },
    )
    return ConvergeOutcome(
        True,
        "noop",
        f"converged on serial {desired.serial} ({desired.digest})",
        desired.digest,
        time.monotonic() - started,
    )


def _agent_update(node: Node, desired: Desired, *, env: dict[str, str]) -> HookResult | None:
    """Run ``agent-update`` once per approved agent release that differs from this agent.

    The release is HEAD's ``updates.agent``; the hook gets ``RECONCILE_AGENT_VERSION``,
    ``RECONCILE_AGENT_RUNNING``, ``RECONCILE_AGENT_DIGEST`` and ``RECONCILE_AGENT_PYTHON``.
    Installing is the hook's job (the sample checks the digest and restarts the service). A
    run is remembered in the node record whatever its exit code, so a failing hook is not
    re-run every pass; a hook that is not installed is not a run, so one added later still
    runs.
    """
    agent = desired.snapshot.updates.get("agent") or {}
    version, digest = agent.get("version"), agent.get("digest")
    if not version or version == __version__:
        return None
    done = node.state.agent_update
    if done and (done.get("version"), done.get("digest")) == (version, digest):
        return None
    result = run_hook(
        Path(node.settings.hooks_dir),
        "agent-update",
        env={
            **env,
            "RECONCILE_AGENT_VERSION": version,
            "RECONCILE_AGENT_RUNNING": __version__,
            "RECONCILE_AGENT_DIGEST": digest or "",
            # The interpreter this agent runs on, so that the hook installs into the agent's
            # own environment (a venv under systemd), not whatever python3 is on PATH.
            "RECONCILE_AGENT_PYTHON": sys.executable,
        },
        timeout_s=node.settings.hook_timeout_s,
    )
    if not result.ran:
        return None
    (log.info if result.ok else log.error)(
        "agent-update for %s (running %s) exited %s", version, __version__, result.exit_code
    )
    record = {
        "version": version,
        "digest": digest,
        "exit_code": result.exit_code,
        "at": format_time(time.time()),
    }
    node.save(replace(node.state, agent_update=record))
    return result


def _mark_applied(node: Node, desired: Desired) -> None:
    state = node.state
    history = [d for d in state.applied_history if d != desired.digest] + [desired.digest]
    node.save(
        replace(
            state,
            applied_digest=desired.digest,
            applied_serial=desired.serial,
            applied_at=format_time(time.time()),
            applied_history=tuple(history[-_HISTORY_KEPT:]),
            converged=True,
            # A fetch error stays until a fetch works (intake clears it): converging on the
            # last known snapshot says nothing about the origin.
            last_error=state.last_error
            if state.last_error is not None and state.last_error.kind in _FETCH_ERROR_KINDS
            else None,
        )
    )


def _apply(
    node: Node,
    node_plan: NodePlan,
    *,
    edge: PodmanEdge,
    store: ModelStore,
    offline: bool,
    reason: str,
    started: float,
    allow_rollback: bool,
) -> ConvergeOutcome:
    desired = node_plan.desired
    attempt = _Attempt(node, desired, reason=reason)
    node.paths.work.mkdir(parents=True, exist_ok=True)
    plan_file = node.paths.work / "plan.json"
    write_atomic(plan_file, (json.dumps(node_plan.to_json(), indent=2) + "\n").encode("utf-8"))
    env = _hook_env(node, desired, reason=reason, plan_file=plan_file)
    before_subclouds = _previous_subclouds(node)
    joined = [s for s in desired.view.subclouds if s not in before_subclouds]
    left = [s for s in before_subclouds if s not in desired.view.subclouds]
    node.save(
        replace(
            node.state,
            converged=False,
            apply_in_progress={
                "commit": desired.commit,
                "digest": desired.digest,
                "serial": desired.serial,
                "reason": reason,
                "started_at": format_time(attempt.started),
            },
        )
    )

    def finish(result: str, error: ReconcilerError | None) -> ConvergeOutcome:
        post_env = {**env, "RECONCILE_RESULT": result}
        attempt.hooks.append(
            run_hook(
                Path(node.settings.hooks_dir),
                "post-apply",
                env=post_env,
                timeout_s=node.settings.hook_timeout_s,
            )
        )
        payload = attempt.receipt(
            result=result,
            error=error.one_line() if error else None,
            containers=_observed_view(edge),
            joined=joined if result == "converged" else [],
            left=left if result == "converged" else [],
        )
        _crash_point("before-receipt")
        try:
            node.history.append_note(
                desired.commit, receipt_line(payload, node_key=node.paths.node_key)
            )
        except ReconcilerError as exc:
            log.error("receipt not written: %s", exc.one_line())
        _write_model_states(node, store, desired)
        node.save(replace(node.state, apply_in_progress=None))
        message = (
            f"converged on serial {desired.serial} ({desired.digest}): "
            f"{len(attempt.outcomes)} container action(s), "
            f"{len(node_plan.models_to_install)} model(s) installed"
            if error is None
            else error.one_line()
        )
        return ConvergeOutcome(
            error is None,
            result,
            message,
            desired.digest,
            time.monotonic() - started,
            tuple(o.action.describe() for o in attempt.outcomes),
        )

    # 3. pre-apply
    pre = run_hook(
        Path(node.settings.hooks_dir), "pre-apply", env=env, timeout_s=node.settings.hook_timeout_s
    )
    attempt.hooks.append(pre)
    if not pre.ok:
        said = [line for line in pre.output.splitlines() if line.strip()]
        if pre.timed_out and said:
            said.pop()  # run_hook's own "[killed after N s]"
        how = (
            f"timed out after {node.settings.hook_timeout_s:g} s"
            if pre.exit_code is None
            else f"exit {pre.exit_code}"
        )
        why = said[-1].strip() if said else "no output"
        veto = HookVetoError(f"pre-apply vetoed serial {desired.serial} ({how}): {why[:200]}")
        node.record_error("veto", veto)
        return finish("vetoed", veto)
    _crash_point("after-pre-apply")
    try:
        # 4. fetch what is needed, touching nothing that runs
        if node_plan.models_to_install:
            attempt.step(
                "models",
                f"{len(node_plan.models_to_install)} model(s), "
                f"{node_plan.download_bytes} bytes to download",
            )
            _ensure_models(node, store, desired, offline=offline)
        _crash_point("after-models")

        def record(outcome: ActionOutcome) -> None:
            attempt.outcomes.append(outcome)
            if outcome.action.kind != "pull":
                attempt.changed = True
            log.info(
                "%s %s (%s)",
                "done" if outcome.ok else "FAILED",
                outcome.action.describe(),
                outcome.message,
            )
            if outcome.action.kind != "pull":
                _crash_point("mid-containers")

        # Pulls (and the conflict check) before runtime files: an image the registry does
        # not have must fail the pass while the running node still reads the old files.
        actions = node_plan.containers.actions
        pulls = replace(node_plan.containers, actions=tuple(a for a in actions if a.kind == "pull"))
        changes = replace(pulls, actions=tuple(a for a in actions if a.kind != "pull"))
        if pulls.actions or pulls.conflicts:
            attempt.step("images", f"{len(pulls.actions)} pull(s)")
            edge.apply(pulls, desired.containers, allow_pull=not offline, on_outcome=record)
        _crash_point("after-images")
        # 5. runtime files
        for name in node_plan.files_changed:
            write_atomic(node.paths.runtime / name, desired.files[name])
        if node_plan.files_changed:
            attempt.changed = True
            attempt.step("runtime-files", ", ".join(node_plan.files_changed))
        _crash_point("after-runtime-files")
        # 6. containers (each gated on health; notify last)
        if changes.actions:
            attempt.step("containers", f"{len(changes.actions)} action(s)")
            edge.apply(changes, desired.containers, allow_pull=not offline, on_outcome=record)
        _crash_point("after-containers")
        # 7. prune
        for model_id in node_plan.trees_to_remove:
            store.remove(model_id)
        if node_plan.trees_to_remove:
            attempt.step("prune", "removed model tree(s) " + ", ".join(node_plan.trees_to_remove))
        gc = store.gc(_keep_digests(node, desired))
        if gc.removed_blobs:
            attempt.step("gc", f"{gc.removed_blobs} blob(s), {gc.freed_bytes} bytes freed")
        _crash_point("after-prune")
    except SnapshotFaultError as exc:
        previous = node.state.applied_digest
        outcome = finish(
            "rolled-back"
            if allow_rollback and previous not in (None, desired.digest)
            else "failed",
            exc,
        )
        return _fault(
            node,
            desired.digest,
            desired.serial,
            exc,
            started=started,
            allow_rollback=allow_rollback,
            offline=offline,
            receipt_commit=None,
            first=outcome,
        )
    except TransientError as exc:
        node.record_error("apply", exc)
        node.save(replace(node.bump_state("apply_failures"), converged=False))
        return finish("failed", exc)
    # 8. record
    _mark_applied(node, desired)
    update = _agent_update(node, desired, env=env)
    if update is not None:
        attempt.hooks.append(update)
    if joined or left:
        attempt.step("participation", f"joined {joined or '-'}, left {left or '-'}")
    return finish("converged", None)


def _ensure_models(node: Node, store: ModelStore, desired: Desired, *, offline: bool) -> None:
    from reconciler.core.errors import DownloadError
    from reconciler.models.download import new_client
    from reconciler.models.progress import ProgressReporter

    if offline:
        report = store.ensure(desired.snapshot.models, client=None, base_url=None)
        if report.missing:
            first = report.missing[0]
            owner = next(m.id for m in desired.snapshot.models if first in m.files)
            raise DownloadError(
                f"offline: {len(report.missing)} model file(s) are not on disk "
                f"(first: {owner}/{first.path})"
            )
        return
    with new_client() as client:
        store.ensure(
            desired.snapshot.models,
            client=client,
            base_url=node.settings.normalised_origin(),
            concurrency=node.settings.download_concurrency,
            progress_reporter=ProgressReporter(),
            reserve_bytes=node.settings.disk_reserve_bytes,
        )


def _fault(
    node: Node,
    digest: str,
    serial: int,
    exc: ReconcilerError,
    *,
    started: float,
    allow_rollback: bool,
    offline: bool,
    receipt_commit: str | None,
    first: ConvergeOutcome | None = None,
) -> ConvergeOutcome:
    """The snapshot is to blame: quarantine it and go back to the last converged snapshot.

    Not when it is the snapshot the node last converged on (drift repair, or the rollback
    itself failing): that one ran before, so its failure now is retried on the next pass, as
    quarantining it would leave the node with nothing it may converge to.
    """
    state = node.bump_state("apply_failures")
    repeat = digest == state.applied_digest
    if not repeat:
        state = replace(state, quarantined=tuple(dict.fromkeys((*state.quarantined, digest))))
        log.error("snapshot %s (serial %d) quarantined: %s", digest, serial, exc.one_line())
    node.save(replace(state, converged=False))
    node.record_error("snapshot" if not repeat else "apply", exc)
    previous = node.state.applied_digest
    roll_back = allow_rollback and previous is not None and not repeat
    if receipt_commit is not None:
        # Refused before any attempt (an unsafe definition): no hooks ran, nothing changed.
        payload = {
            "config_digest": digest,
            "serial": serial,
            "commit": receipt_commit,
            "result": "rolled-back" if roll_back else "failed",
            "reason": node.history.info(receipt_commit).reason,
            "started_at": format_time(time.time()),
            "finished_at": format_time(time.time()),
            "agent_version": __version__,
            "error": exc.one_line(),
            "actions": [],
        }
        try:
            node.history.append_note(
                receipt_commit, receipt_line(payload, node_key=node.paths.node_key)
            )
        except ReconcilerError as failure:
            log.error("receipt not written: %s", failure.one_line())
    if not roll_back or previous is None:
        return ConvergeOutcome(
            False,
            "failed",
            exc.one_line() if repeat else f"{exc.one_line()} (quarantined {digest[:19]}…)",
            digest,
            time.monotonic() - started,
        )
    back = rollback_to(node, previous, reason="rollback", hold=False, offline=offline)
    # The rollback's own success clears the last error; why it happened stays visible.
    node.record_error("snapshot", exc)
    message = f"{exc.one_line()}; rolled back to {previous[:19]}… ({back.message})"
    return ConvergeOutcome(False, "rolled-back", message, digest, time.monotonic() - started)


def rollback_to(
    node: Node, digest_or_commit: str, *, reason: str, hold: bool, offline: bool
) -> ConvergeOutcome:
    """Make an earlier snapshot HEAD again (a new commit) and converge to it, once."""
    oid = node.history.snapshot_ref(digest_or_commit) or node.history.resolve(digest_or_commit)
    node.history.recommit(oid, reason=reason)
    state = node.bump_state("rollbacks")
    target = node.history.info(oid).digest
    node.save(
        replace(
            state,
            # The operator's explicit choice overrides a quarantine of the target.
            quarantined=tuple(d for d in state.quarantined if d != target or not hold),
            expected_head=node.history.head_oid(),
            hold=hold or state.hold,
            hold_reason=(
                f"rollback to {node.history.info(oid).digest[:19]}…" if hold else state.hold_reason
            ),
        )
    )
    return converge(node, offline=offline, reason=reason, allow_rollback=False)
