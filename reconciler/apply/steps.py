"""Steps 3 to 8 of the apply (docs/apply-order.md), one function each.

Where it sits: ``apply.transaction`` runs them in order, once per attempt; each step gets the
edges it uses and writes what it did into the ``AttemptLog``. A step that fails raises the
project's error (``HookVetoError``, a ``TransientError``, a ``SnapshotFaultError``); what
that means for the node is ``apply.policy``'s decision, not the step's. No step touches the
node record except through ``core.record`` transitions, and only step 8 does (and
``note_refused_hooks``, at the end of every attempt: which hooks strict modes refused).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.apply.attempt import AttemptLog
from reconciler.apply.edges import Clock, CrashSeam, HookRunner, ModelsEdge, RuntimeEdge
from reconciler.apply.nodeplan import NodePlan
from reconciler.apply.target import ApplyTarget
from reconciler.core.agentrelease import AgentRelease, runtime_update_check
from reconciler.core.documents import Snapshot, format_time, loads_strict
from reconciler.core.errors import HistoryError, HookVetoError, ReconcilerError, TransientError
from reconciler.core.record import (
    agent_update_ran,
    mark_applied,
    refusal_cleared,
    refusal_noted,
)
from reconciler.disk.atomic import write_atomic
from reconciler.history.node import Node
from reconciler.runtime.hooks import HookResult
from reconciler.runtime.podman import ActionOutcome
from reconciler.selfupdate.install import UpdateAsk, consider, events_for_receipt

__all__ = [
    "agent_release",
    "change_containers",
    "fetch_models",
    "held_suffix",
    "hook_env",
    "note_refused_hooks",
    "observed_view",
    "participation_moves",
    "prune",
    "pull_images",
    "record_applied",
    "retained_digests",
    "run_agent_update",
    "run_pre_apply",
    "self_update",
    "write_host_facts",
    "write_model_states",
    "write_plan",
    "write_runtime_files",
]

log = logging.getLogger("reconciler")


# ---- 3. pre-apply ----------------------------------------------------------------------------


def write_plan(node_plan: NodePlan, *, work_dir: Path) -> Path:
    """``work/plan.json``: the plan the hooks get as ``RECONCILE_PLAN``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    plan_file = work_dir / "plan.json"
    write_atomic(plan_file, (json.dumps(node_plan.to_json(), indent=2) + "\n").encode("utf-8"))
    return plan_file


def hook_env(node: Node, target: ApplyTarget, *, reason: str, plan_file: Path) -> dict[str, str]:
    """The ``RECONCILE_*`` variables of ``pre-apply`` and ``post-apply`` (docs/contract.md §7)."""
    return {
        "RECONCILE_CONFIG_DIGEST": target.digest,
        "RECONCILE_PREVIOUS_DIGEST": node.state.applied_digest or "",
        "RECONCILE_SERIAL": str(target.serial),
        "RECONCILE_REASON": reason,
        "RECONCILE_PLAN": str(plan_file),
        "RECONCILE_STATE_DIR": str(node.paths.state_dir),
        "RECONCILE_PODMAN_URL": node.settings.effective_podman_url,
    }


def run_pre_apply(
    target: ApplyTarget, *, hooks: HookRunner, env: dict[str, str], attempt: AttemptLog
) -> None:
    """Run ``pre-apply``; a non-zero exit, a timeout or a hook that strict modes refuse to
    run is a veto (``HookVetoError``)."""
    pre = hooks.run("pre-apply", env=env)
    attempt.hook(pre)
    if pre.ok:
        return
    if pre.refused is not None:
        raise HookVetoError(f"pre-apply vetoed serial {target.serial} (not run): {pre.refused}")
    said = [line for line in pre.output.splitlines() if line.strip()]
    if pre.timed_out and said:
        said.pop()  # run_hook's own "[killed after N s]"
    how = (
        f"timed out after {hooks.timeout_s:g} s"
        if pre.exit_code is None
        else f"exit {pre.exit_code}"
    )
    why = said[-1].strip() if said else "no output"
    raise HookVetoError(f"pre-apply vetoed serial {target.serial} ({how}): {why[:200]}")


def note_refused_hooks(node: Node, results: Iterable[HookResult], *, clock: Clock) -> None:
    """Keep in the node record which of these hooks strict modes refused to run, for
    ``status`` (``refused_hooks``); a hook asked again and not refused (it ran, or is gone)
    is cleared. Saved only when that changes something."""
    state = before = node.state
    for result in results:
        if result.refused is not None:
            at = format_time(clock())
            state = refusal_noted(state, what=result.name, reason=result.refused, at=at)
        else:
            state = refusal_cleared(state, what=result.name)
    if state is not before:
        node.save(state)


# ---- 4. fetch what is needed, touching nothing that runs -------------------------------------


def fetch_models(
    node_plan: NodePlan, *, models: ModelsEdge, offline: bool, attempt: AttemptLog
) -> None:
    if not node_plan.models_to_install:
        return
    attempt.step(
        "models",
        f"{len(node_plan.models_to_install)} model(s), "
        f"{node_plan.download_bytes} bytes to download",
    )
    models.ensure(node_plan.target.snapshot.models, offline=offline)


def pull_images(
    node_plan: NodePlan, *, runtime: RuntimeEdge, offline: bool, attempt: AttemptLog
) -> None:
    """Pulls (and the conflict check) before the runtime files: an image the registry does
    not have must fail the pass while the running node still reads the old files."""
    pulls = node_plan.image_pulls
    if not (pulls.actions or pulls.conflicts):
        return
    attempt.step("images", f"{len(pulls.actions)} pull(s)")
    runtime.apply(
        pulls, node_plan.target.containers, allow_pull=not offline, on_outcome=attempt.outcome
    )


# ---- 5. runtime files ------------------------------------------------------------------------


def write_runtime_files(node_plan: NodePlan, *, runtime_dir: Path, attempt: AttemptLog) -> None:
    for name in node_plan.files_changed:
        write_atomic(runtime_dir / name, node_plan.target.files[name])
    if node_plan.files_changed:
        attempt.step("runtime-files", ", ".join(node_plan.files_changed))


# ---- 6. containers ---------------------------------------------------------------------------


def change_containers(
    node_plan: NodePlan,
    *,
    runtime: RuntimeEdge,
    offline: bool,
    attempt: AttemptLog,
    crash: CrashSeam,
) -> None:
    """Remove, replace, create, start, notify: each gated on health by the runtime edge."""
    changes = node_plan.container_changes
    if not changes.actions:
        return
    attempt.step("containers", f"{len(changes.actions)} action(s)")

    def done(outcome: ActionOutcome) -> None:
        attempt.outcome(outcome)
        crash("mid-containers")

    runtime.apply(changes, node_plan.target.containers, allow_pull=not offline, on_outcome=done)


# ---- 7. prune --------------------------------------------------------------------------------


def _model_digests(snapshot_payload: bytes) -> set[str]:
    obj = loads_strict(snapshot_payload)
    return {f["digest"] for m in obj.get("models", []) for f in m.get("files", [])}


def retained_digests(node: Node, target: ApplyTarget) -> set[str]:
    """Blobs that garbage collection must keep: the target's and the last K applied
    snapshots' (``keep_applied``), so that a rollback to them needs no download."""
    keep = {f.digest for m in target.snapshot.models for f in m.files}
    recent = [d for d in node.state.applied_history if d != target.digest]
    kept = node.settings.keep_applied
    for digest in recent[-kept:] if kept else []:
        oid = node.history.snapshot_ref(digest)
        if oid is None:
            continue
        try:
            payload, _ = node.history.blobs(oid)
            keep |= _model_digests(payload)
        except (HistoryError, ValueError, AttributeError, TypeError):
            continue
    return keep


def prune(node_plan: NodePlan, *, models: ModelsEdge, keep: set[str], attempt: AttemptLog) -> None:
    for model_id in node_plan.trees_to_remove:
        models.remove(model_id)
    if node_plan.trees_to_remove:
        attempt.step("prune", "removed model tree(s) " + ", ".join(node_plan.trees_to_remove))
    freed = models.gc(keep)
    if freed.removed_blobs:
        attempt.step("gc", f"{freed.removed_blobs} blob(s), {freed.freed_bytes} bytes freed")


# ---- 8. record -------------------------------------------------------------------------------


def participation_moves(runtime_dir: Path, target: ApplyTarget) -> tuple[list[str], list[str]]:
    """Subclouds (joined, left) by the target, against ``runtime/participation.json``; read
    before step 5 rewrites that file."""
    try:
        data = json.loads((runtime_dir / "participation.json").read_bytes())
        before = [str(s) for s in data.get("subclouds", [])]
    except (OSError, ValueError, AttributeError):
        before = []
    joined = [s for s in target.view.subclouds if s not in before]
    left = [s for s in before if s not in target.view.subclouds]
    return joined, left


def record_applied(
    node: Node,
    target: ApplyTarget,
    *,
    hooks: HookRunner,
    clock: Clock,
    env: dict[str, str],
    attempt: AttemptLog,
    moves: tuple[list[str], list[str]],
    offline: bool = False,
) -> None:
    """The node converged: the record says so, then ``agent-update`` may run, or, without
    that hook and with ``self_update`` on, the built-in installer (docs/contract.md §10)."""
    at = format_time(clock())
    node.save(mark_applied(node.state, digest=target.digest, serial=target.serial, at=at))
    agent_release(
        node, target.snapshot, hooks=hooks, clock=clock, env=env, offline=offline, attempt=attempt
    )
    joined, left = moves
    if joined or left:
        attempt.step("participation", f"joined {joined or '-'}, left {left or '-'}")


def _hook_installed(node: Node, name: str) -> bool:
    path = Path(node.settings.hooks_dir) / name
    return path.is_file() and os.access(path, os.X_OK)


def agent_release(
    node: Node,
    snapshot: Snapshot,
    *,
    hooks: HookRunner,
    clock: Clock,
    env: dict[str, str],
    offline: bool,
    attempt: AttemptLog | None,
) -> None:
    """After every converged pass (an apply's step 8, or a pass with nothing to do): the
    ``agent-update`` hook where installed, else the built-in installer when ``self_update``
    is on. ``attempt`` is None on a pass that writes no receipt."""
    checked = runtime_update_check(snapshot.updates, {r.name: r.image for r in snapshot.runtimes})
    if checked["warning"] and attempt is not None:
        log.warning("%s", checked["warning"])  # once per apply; status shows it all along
    update = run_agent_update(node, snapshot, hooks=hooks, clock=clock, env=env)
    if update is None and "agent-update" in node.state.refused:
        # Not asked, or not installed: a refusal recorded earlier is no longer current.
        node.save(refusal_cleared(node.state, what="agent-update"))
    if update is not None:
        note_refused_hooks(node, [update], clock=clock)
        if attempt is not None:
            attempt.hook(update)
    elif node.settings.self_update and not _hook_installed(node, "agent-update"):
        self_update(node, snapshot, clock=clock, offline=offline, attempt=attempt)
    if attempt is not None:
        for line in events_for_receipt(node.paths.state_dir):
            attempt.step("agent-event", line)


def self_update(
    node: Node, snapshot: Snapshot, *, clock: Clock, offline: bool, attempt: AttemptLog | None
) -> None:
    """Install and select the approved agent release; a failure is one line in the log and
    the receipt, never a failed apply (the node did converge), and the next pass retries."""
    release = AgentRelease.from_updates(snapshot.updates)
    if release is None:
        return
    ask = UpdateAsk(
        release=release,
        base_url=node.settings.normalised_origin(),
        offline=offline,
        min_version=node.settings.agent_min_version,
        at=format_time(clock()),
    )
    try:
        done = consider(node.paths.state_dir, ask)
    except TransientError as exc:
        log.error("%s", exc.one_line())
        if attempt is not None:
            attempt.step("agent", exc.one_line())
        return
    if done is None:
        return
    line, changed = done
    if attempt is not None:
        attempt.step("agent", line)
    elif changed:
        log.info("agent: %s", line)


def _approved_release(
    snapshot: Snapshot, done: dict[str, Any] | None
) -> tuple[str, str | None] | None:
    """HEAD's approved agent (version, digest), unless it runs already or had its hook run."""
    agent = snapshot.updates.get("agent") or {}
    version, digest = agent.get("version"), agent.get("digest")
    if not version or version == __version__:
        return None
    if done and (done.get("version"), done.get("digest")) == (version, digest):
        return None
    return str(version), digest


def run_agent_update(
    node: Node, snapshot: Snapshot, *, hooks: HookRunner, clock: Clock, env: dict[str, str]
) -> HookResult | None:
    """Run ``agent-update`` once per approved agent release that differs from this agent.

    The release is the snapshot's ``updates.agent``; installing is the hook's job (the sample
    checks the digest and restarts the service). A run is remembered in the node record
    whatever its exit code, so a failing hook is not re-run every pass; a hook that is not
    installed is not a run, so one added later still runs; nor is one that strict modes
    refuse (its result, with ``refused``, goes to the receipt), so it runs once it is fixed.
    """
    release = _approved_release(snapshot, node.state.agent_update)
    if release is None:
        return None
    version, digest = release
    more = {
        "RECONCILE_AGENT_VERSION": version,
        "RECONCILE_AGENT_RUNNING": __version__,
        "RECONCILE_AGENT_DIGEST": digest or "",
        # The interpreter this agent runs on, so that the hook installs into the agent's
        # own environment (a venv under systemd), not whatever python3 is on PATH.
        "RECONCILE_AGENT_PYTHON": sys.executable,
    }
    result = hooks.run("agent-update", env={**env, **more})
    if result.refused is not None:
        return result
    if not result.ran:
        return None
    (log.info if result.ok else log.error)(
        "agent-update for %s (running %s) exited %s", version, __version__, result.exit_code
    )
    node.save(
        agent_update_ran(
            node.state,
            version=version,
            digest=digest,
            exit_code=result.exit_code,
            at=format_time(clock()),
        )
    )
    return result


def observed_view(runtime: RuntimeEdge) -> list[dict[str, Any]]:
    """The containers seen at the end of an attempt, for its receipt (none if unreachable)."""
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
            for c in runtime.observe()
        ]
    except ReconcilerError:
        return []


def write_host_facts(state_dir: Path, target: ApplyTarget) -> None:
    """``gpus.json``: the GPU facts, the CDI specs and the held runtimes of this pass, for
    ``status``, the metrics and the node report (which never read NVML themselves). Written
    only when it changes, so a converged node does not rewrite it every pass."""
    data = (json.dumps(target.facts_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")
    path = state_dir / "gpus.json"
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_atomic(path, data)


def held_suffix(target: ApplyTarget) -> str:
    """What an outcome's line adds for runtimes held back: they are not an error."""
    if not target.held:
        return ""
    return "; " + "; ".join(h.describe().removeprefix("hold ") + " (held)" for h in target.held)


def write_model_states(state_dir: Path, models: ModelsEdge, target: ApplyTarget) -> None:
    """``model-states.json``: what ``status`` shows for each model of the target."""
    payload = {"config_digest": target.digest, "models": models.states(target.snapshot.models)}
    write_atomic(
        state_dir / "model-states.json",
        (json.dumps(payload, indent=2) + "\n").encode("utf-8"),
    )
