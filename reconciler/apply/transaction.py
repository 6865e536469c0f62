"""Converge the node to HEAD as one transaction: all of it, or back to what ran before.

Where it sits: called by ``agent`` (once / watch) and by ``rollback`` / ``resume`` with the
agent lock held. ``converge`` wires the production edges (``apply.edges``) and runs
``converge_with``, which follows the one documented order (docs/apply-order.md), each step a
function of its own module:

 0. ``recovery``: leftover temporaries, a receipt for an attempt that died (``interrupted``);
    a HEAD moved with git becomes a hold;
 1. ``target``: skip a quarantined HEAD the node is not running; re-verify HEAD's commit
    against the root that accepted it (an unverified tree is never applied) and compute the
    target;
 2. ``nodeplan``: observe the runtime and the model store, plan; a converged node stops here
    (no hook, no model byte read; a receipt only if convergence is news after a crash);
 3. ``steps.run_pre_apply`` (a veto changes nothing);
 4. ``steps.fetch_models`` (space checked first) and ``steps.pull_images`` (a plan with
    conflicts is refused here), while nothing running is touched;
 5. ``steps.write_runtime_files`` (``jobs.json``, ``participation.json``, ``env``, …),
    atomically, so new containers start with them;
 6. ``steps.change_containers`` by their strategy, each gated on health; runtimes whose
    ``jobs.json`` changed are notified (restart or signal);
 7. ``steps.prune``: model trees HEAD no longer has, blobs outside the retention window;
 8. ``steps.record_applied`` (node record, ``agent-update``), then ``_finish``: ``post-apply``,
    the signed receipt (``receipt``), model states.

What a failure means is ``policy.judge``'s verdict, carried out by ``_carry_out``: quarantine
and a ``Reason: rollback`` commit for the snapshot's own fault, a retry on the next pass for
anything else. ``apply.crash`` is the ``RECONCILER_TEST_DIE_AT`` test seam at each boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial

from reconciler.apply.attempt import AttemptLog
from reconciler.apply.crash import CRASH_POINTS
from reconciler.apply.edges import Clock, Edges, production_edges
from reconciler.apply.nodeplan import NodePlan, plan_node
from reconciler.apply.policy import Verdict, judge
from reconciler.apply.receipt import Receipt, sign_and_note
from reconciler.apply.recovery import recover
from reconciler.apply.steps import (
    agent_release,
    change_containers,
    fetch_models,
    held_suffix,
    hook_env,
    note_refused_hooks,
    observed_view,
    participation_moves,
    prune,
    pull_images,
    record_applied,
    retained_digests,
    run_pre_apply,
    write_host_facts,
    write_model_states,
    write_plan,
    write_runtime_files,
)
from reconciler.apply.target import ApplyTarget, load_target
from reconciler.core.documents import format_time
from reconciler.core.errors import (
    HistoryError,
    ReconcilerError,
    RejectedError,
    SnapshotFaultError,
    TransientError,
)
from reconciler.core.outcome import ApplyResult, ConvergeOutcome
from reconciler.core.record import (
    LastError,
    apply_failed,
    begin_apply,
    clear_apply_error,
    end_apply,
    mark_applied,
    mark_not_converged,
    note_fault,
    rolled_back,
)
from reconciler.history.node import Node

__all__ = [
    "CRASH_POINTS",
    "ConvergeOutcome",
    "converge",
    "converge_with",
    "rollback_to",
    "rollback_with",
]

log = logging.getLogger("reconciler")


def converge(
    node: Node,
    *,
    offline: bool,
    full_verify: bool = False,
    reason: str | None = None,
    allow_rollback: bool = True,
) -> ConvergeOutcome:
    """Make the node match HEAD, with the production edges (module docstring)."""
    with production_edges(node) as edges:
        return converge_with(
            node,
            edges=edges,
            offline=offline,
            full_verify=full_verify,
            reason=reason,
            allow_rollback=allow_rollback,
        )


def rollback_to(
    node: Node, digest_or_commit: str, *, reason: str, hold: bool, offline: bool
) -> ConvergeOutcome:
    """Make an earlier snapshot HEAD again (a new commit) and converge to it, once."""
    with production_edges(node) as edges:
        return rollback_with(
            node, digest_or_commit, edges=edges, reason=reason, manual=hold, offline=offline
        )


def converge_with(
    node: Node,
    *,
    edges: Edges,
    offline: bool,
    full_verify: bool = False,
    reason: str | None = None,
    allow_rollback: bool = True,
) -> ConvergeOutcome:
    """Make the node match HEAD through ``edges``: steps 0 to 8, then the failure policy."""
    started = time.monotonic()
    recover(node, clock=edges.clock)
    decided = _decide_target(node, edges=edges, offline=offline, allow_rollback=allow_rollback)
    if not isinstance(decided, ApplyTarget):
        return decided
    reason = reason or ("repair" if node.state.applied_digest == decided.digest else decided.reason)
    write_host_facts(node.paths.state_dir, decided)
    try:
        if full_verify:
            for line in edges.models.verify():
                log.warning("verify: %s", line)
        outcome = _plan_and_apply(
            node,
            decided,
            edges=edges,
            offline=offline,
            reason=reason,
            allow_rollback=allow_rollback,
        )
    except TransientError as exc:
        node.save(mark_not_converged(node.state, error=_last_error("apply", exc, edges.clock)))
        outcome = ConvergeOutcome(
            converged=False,
            result=ApplyResult.FAILED,
            message=exc.one_line(),
            digest=decided.digest,
        )
    return replace(outcome, duration_s=time.monotonic() - started)


def _last_error(kind: str, error: ReconcilerError, clock: Clock) -> LastError:
    return LastError(at=format_time(clock()), kind=kind, message=error.one_line())


# ---- 1. which HEAD ---------------------------------------------------------------------------


def _decide_target(
    node: Node, *, edges: Edges, offline: bool, allow_rollback: bool
) -> ApplyTarget | ConvergeOutcome:
    """Step 1: HEAD's target, or why there is none to converge to (then the pass ends)."""
    started = time.monotonic()
    head = node.history.head_oid()
    if head is None:
        return ConvergeOutcome(
            converged=False,
            result=ApplyResult.NOTHING,
            message="no snapshot yet: run `reconcile fetch`",
        )
    skipped = _quarantined_head(node, head)
    if skipped is not None:
        return skipped
    try:
        return load_target(node, head, host=edges.host.read(node.settings))
    except RejectedError as exc:
        return _unverified(node, head, exc, clock=edges.clock)
    except SnapshotFaultError as exc:
        outcome = _refuse(
            node, head, exc, edges=edges, offline=offline, allow_rollback=allow_rollback
        )
        return replace(outcome, duration_s=time.monotonic() - started)


def _quarantined_head(node: Node, head: str) -> ConvergeOutcome | None:
    """HEAD names a quarantined snapshot the node is not running: do not apply it again.

    This is the case after a first snapshot failed with nothing to roll back to; it waits for
    a higher serial or ``reconcile resume`` (docs/contract.md §5).
    """
    try:
        info = node.history.info(head)
    except HistoryError:
        return None  # load_target reports it
    if info.digest not in node.state.quarantined or info.digest == node.state.applied_digest:
        return None
    return ConvergeOutcome(
        converged=False,
        result=ApplyResult.QUARANTINED,
        message=f"HEAD serial {info.serial} ({info.digest}) is quarantined: not applied again "
        "until a higher serial arrives or `reconcile resume`",
        digest=info.digest,
    )


def _unverified(node: Node, head: str, exc: RejectedError, *, clock: Clock) -> ConvergeOutcome:
    """Never applied; and whatever runs is not what HEAD names, so not converged."""
    error = _last_error("apply", RejectedError(f"HEAD commit {head[:12]}", exc.reason), clock)
    node.save(mark_not_converged(node.state, error=error))
    return ConvergeOutcome(
        converged=False,
        result=ApplyResult.FAILED,
        message=f"HEAD {head[:12]} fails verification: {exc.reason}",
    )


def _refuse(
    node: Node,
    head: str,
    exc: SnapshotFaultError,
    *,
    edges: Edges,
    offline: bool,
    allow_rollback: bool,
) -> ConvergeOutcome:
    """HEAD cannot even be planned (an unsafe definition): the snapshot's fault, before any
    attempt, so no hook ran and nothing changed; its receipt says only why."""
    info = node.history.info(head)
    verdict = judge(
        exc, digest=info.digest, applied=node.state.applied_digest, allow_rollback=allow_rollback
    )
    now = format_time(edges.clock())
    receipt = Receipt(
        commit=head,
        config_digest=info.digest,
        serial=info.serial,
        result=verdict.result,
        reason=info.reason,
        started_at=now,
        finished_at=now,
        error=exc.one_line(),
    )
    sign_and_note(node.history, receipt, node_key=node.paths.node_key)
    return _carry_out(
        node, verdict, exc, digest=info.digest, serial=info.serial, edges=edges, offline=offline
    )


# ---- 2. plan; nothing to do ----------------------------------------------------------------


def _plan_and_apply(
    node: Node,
    target: ApplyTarget,
    *,
    edges: Edges,
    offline: bool,
    reason: str,
    allow_rollback: bool,
) -> ConvergeOutcome:
    """Step 2, then steps 3 to 8 unless the node is on its target already."""
    node_plan = plan_node(
        target, runtime_dir=node.paths.runtime, runtime=edges.runtime, models=edges.models
    )
    if node_plan.empty:
        return _settle(node, target, edges=edges, reason=reason, offline=offline)
    return _attempt(
        node, node_plan, edges=edges, offline=offline, reason=reason, allow_rollback=allow_rollback
    )


def _settle(
    node: Node, target: ApplyTarget, *, edges: Edges, reason: str, offline: bool
) -> ConvergeOutcome:
    """Nothing to do. Record convergence if this is news (e.g. after a crash mid-record)."""
    state = node.state
    if not (state.converged and state.applied_digest == target.digest):
        # An interrupted pass made every change (Podman finished what it was asked) but
        # never said so: this pass is the one that finds the node on HEAD, so it signs the
        # receipt; otherwise the audit trail would never show this snapshot converged.
        attempt = AttemptLog(target, reason=reason, clock=edges.clock)
        attempt.step("settled", "nothing left to do: an earlier pass had made every change")
        receipt = attempt.receipt(
            result=ApplyResult.CONVERGED,
            error=None,
            containers=observed_view(edges.runtime),
            joined=[],
            left=[],
        )
        sign_and_note(node.history, receipt, node_key=node.paths.node_key)
        at = format_time(edges.clock())
        node.save(mark_applied(node.state, digest=target.digest, serial=target.serial, at=at))
        write_model_states(node.paths.state_dir, edges.models, target)
    elif (cleared := clear_apply_error(state)) is not state:
        node.save(cleared)
    # An agent-update hook installed after the apply that approved the release runs now.
    env = {
        "RECONCILE_CONFIG_DIGEST": target.digest,
        "RECONCILE_SERIAL": str(target.serial),
        "RECONCILE_STATE_DIR": str(node.paths.state_dir),
    }
    agent_release(
        node,
        target.snapshot,
        hooks=edges.hooks,
        clock=edges.clock,
        env=env,
        offline=offline,
        attempt=None,
    )
    return ConvergeOutcome(
        converged=True,
        result=ApplyResult.NOOP,
        message=f"converged on serial {target.serial} ({target.digest}){held_suffix(target)}",
        digest=target.digest,
    )


# ---- 3 to 8. the attempt ---------------------------------------------------------------------


def _attempt(
    node: Node,
    node_plan: NodePlan,
    *,
    edges: Edges,
    offline: bool,
    reason: str,
    allow_rollback: bool,
) -> ConvergeOutcome:
    """One attempt: whatever its end, ``post-apply`` runs and it leaves exactly one receipt."""
    target = node_plan.target
    attempt = AttemptLog(target, reason=reason, clock=edges.clock)
    env = _begin(node, node_plan, attempt=attempt)
    for held in target.held:
        attempt.step("held", held.describe())
    moves = participation_moves(node.paths.runtime, target)
    finish = partial(_finish, node, node_plan, edges=edges, attempt=attempt, env=env, moves=moves)
    try:
        _run_steps(node, node_plan, edges=edges, attempt=attempt, env=env, offline=offline)
    except (SnapshotFaultError, TransientError) as exc:
        applied = node.state.applied_digest
        verdict = judge(exc, digest=target.digest, applied=applied, allow_rollback=allow_rollback)
        ended = finish(result=verdict.result, error=exc)
        return _carry_out(
            node,
            verdict,
            exc,
            digest=target.digest,
            serial=target.serial,
            edges=edges,
            offline=offline,
            actions=ended.actions,
        )
    record_applied(
        node,
        target,
        hooks=edges.hooks,
        clock=edges.clock,
        env=env,
        attempt=attempt,
        moves=moves,
        offline=offline,
    )
    return finish(result=ApplyResult.CONVERGED, error=None)


def _begin(node: Node, node_plan: NodePlan, *, attempt: AttemptLog) -> dict[str, str]:
    """Write ``work/plan.json`` and mark the apply in progress; the hooks' environment."""
    target = node_plan.target
    plan_file = write_plan(node_plan, work_dir=node.paths.work)
    env = hook_env(node, target, reason=attempt.reason, plan_file=plan_file)
    marked = begin_apply(
        node.state,
        commit=target.commit,
        digest=target.digest,
        serial=target.serial,
        reason=attempt.reason,
        started_at=format_time(attempt.started),
    )
    node.save(marked)
    return env


def _run_steps(
    node: Node,
    node_plan: NodePlan,
    *,
    edges: Edges,
    attempt: AttemptLog,
    env: dict[str, str],
    offline: bool,
) -> None:
    """Steps 3 to 7 in their order, each followed by its crash point."""
    crash = edges.crash
    run_pre_apply(node_plan.target, hooks=edges.hooks, env=env, attempt=attempt)
    crash("after-pre-apply")
    fetch_models(node_plan, models=edges.models, offline=offline, attempt=attempt)
    crash("after-models")
    pull_images(node_plan, runtime=edges.runtime, offline=offline, attempt=attempt)
    crash("after-images")
    write_runtime_files(node_plan, runtime_dir=node.paths.runtime, attempt=attempt)
    crash("after-runtime-files")
    change_containers(
        node_plan, runtime=edges.runtime, offline=offline, attempt=attempt, crash=crash
    )
    crash("after-containers")
    keep = retained_digests(node, node_plan.target)
    prune(node_plan, models=edges.models, keep=keep, attempt=attempt)
    crash("after-prune")


def _finish(
    node: Node,
    node_plan: NodePlan,
    *,
    edges: Edges,
    attempt: AttemptLog,
    env: dict[str, str],
    result: ApplyResult,
    error: ReconcilerError | None,
    moves: tuple[list[str], list[str]],
) -> ConvergeOutcome:
    """The end of every attempt: ``post-apply``, the receipt, model states, mark cleared."""
    target = node_plan.target
    attempt.hook(edges.hooks.run("post-apply", env={**env, "RECONCILE_RESULT": result.value}))
    # A refused post-apply cannot veto (the pass is over), so status is where it shows.
    note_refused_hooks(node, attempt.hooks, clock=edges.clock)
    joined, left = moves if result is ApplyResult.CONVERGED else ([], [])
    receipt = attempt.receipt(
        result=result,
        error=error.one_line() if error else None,
        containers=observed_view(edges.runtime),
        joined=joined,
        left=left,
    )
    edges.crash("before-receipt")
    sign_and_note(node.history, receipt, node_key=node.paths.node_key)
    write_model_states(node.paths.state_dir, edges.models, target)
    node.save(end_apply(node.state))
    message = (
        f"converged on serial {target.serial} ({target.digest}): "
        f"{len(attempt.outcomes)} container action(s), "
        f"{len(node_plan.models_to_install)} model(s) installed{held_suffix(target)}"
        if error is None
        else error.one_line()
    )
    return ConvergeOutcome(
        converged=error is None,
        result=result,
        message=message,
        digest=target.digest,
        actions=tuple(o.action.describe() for o in attempt.outcomes),
    )


# ---- the failure policy, carried out ---------------------------------------------------------


def _carry_out(
    node: Node,
    verdict: Verdict,
    exc: ReconcilerError,
    *,
    digest: str,
    serial: int,
    edges: Edges,
    offline: bool,
    actions: tuple[str, ...] = (),
) -> ConvergeOutcome:
    """Record a failed apply as ``verdict`` says, and roll back if it says so.

    The record is written after the attempt's receipt: a crash between the two leaves the
    snapshot unquarantined, so the next pass tries it (and its rollback) again rather than
    sit on a quarantined HEAD that was never rolled back.
    """
    error = _last_error(verdict.error_kind, exc, edges.clock)
    quarantined = digest if verdict.quarantine else None
    node.save(
        apply_failed(node.state, error=error, counted=verdict.counted, quarantined=quarantined)
    )
    if quarantined is not None:
        log.error("snapshot %s (serial %d) quarantined: %s", digest, serial, exc.one_line())
    previous = verdict.roll_back_to
    if previous is None:
        message = exc.one_line()
        if quarantined is not None:
            message += f" (quarantined {digest[:19]}…)"
        return ConvergeOutcome(
            converged=False, result=verdict.result, message=message, digest=digest, actions=actions
        )
    back = rollback_with(
        node, previous, edges=edges, reason="rollback", manual=False, offline=offline
    )
    # The rollback's own success clears the last error; why it happened stays visible.
    node.save(note_fault(node.state, error=_last_error("snapshot", exc, edges.clock)))
    return ConvergeOutcome(
        converged=False,
        result=ApplyResult.ROLLED_BACK,
        message=f"{exc.one_line()}; rolled back to {previous[:19]}… ({back.message})",
        digest=digest,
        actions=actions,
    )


def rollback_with(
    node: Node, digest_or_commit: str, *, edges: Edges, reason: str, manual: bool, offline: bool
) -> ConvergeOutcome:
    """``rollback_to`` through ``edges``: a new commit of an earlier snapshot, then one
    converge that may not roll back itself."""
    oid = node.history.snapshot_ref(digest_or_commit) or node.history.resolve(digest_or_commit)
    node.history.recommit(oid, reason=reason)
    target = node.history.info(oid).digest
    head = node.history.head_oid()
    node.save(rolled_back(node.state, target=target, head=head, manual=manual))
    return converge_with(node, edges=edges, offline=offline, reason=reason, allow_rollback=False)
