"""Operator control of what the node converges to: manual rollback, hold, resume.

Edge module (git, node record), called by the CLI with the agent lock held. Rollback makes an
earlier snapshot HEAD again as a new ``Reason: rollback`` commit and holds automatic advance;
resume lifts the hold and every quarantine and moves HEAD to the newest snapshot stored while
held (``Reason: resume``). Both then converge through ``apply``.

Resume respects rollouts (docs/contract.md §8): it lifts what the operator or a failure put
in the way, not the network's waves. When the newest stored snapshot is the one its head's
rollout keeps out and this node's wave has not opened, HEAD stays and the snapshot goes on
waiting (``watch`` or the next fetch moves to it when the wave opens); an older snapshot is
not taken instead, since the newer head superseded it. A resume that lands on a snapshot of
a rollout whose wave has opened records that wave in its commit's trailers.
"""

from __future__ import annotations

import time

from reconciler.apply.transaction import ConvergeOutcome, converge, rollback_to
from reconciler.core.documents import format_time
from reconciler.core.errors import HistoryError
from reconciler.core.record import entered_wave, expect_head, release
from reconciler.core.rollout import Admission, RolloutWait
from reconciler.history.node import Node

__all__ = ["default_rollback_target", "resume", "rollback"]


def default_rollback_target(node: Node) -> str:
    """The snapshot applied before the current one."""
    current = node.state.applied_digest
    earlier = [d for d in node.state.applied_history if d != current]
    if not earlier:
        raise HistoryError("no earlier applied snapshot to roll back to; name one (REV)")
    return earlier[-1]


def rollback(node: Node, rev: str | None, *, offline: bool) -> ConvergeOutcome:
    target = rev or default_rollback_target(node)
    oid = node.history.snapshot_ref(target) or node.history.resolve(target)
    return rollback_to(node, oid, reason="rollback", hold=True, offline=offline)


def _newest_waiting(node: Node) -> str | None:
    head = node.history.head_oid()
    head_serial = node.history.info(head).serial if head else 0
    best: tuple[int, str] | None = None
    # Every stored snapshot has a ref, so the refs alone cover the recorded waiting list.
    for oid in node.history.snapshot_refs().values():
        serial = node.history.info(oid).serial
        if serial > head_serial and (best is None or serial > best[0]):
            best = (serial, oid)
    return best[1] if best else None


def resume(node: Node, *, offline: bool, now: float | None = None) -> tuple[str, ConvergeOutcome]:
    """Lift hold and quarantine; advance to the newest waiting snapshot its rollout admits;
    converge."""
    now = time.time() if now is None else now
    node.save(release(node.state))
    history = node.history
    if history.head_is_detached():
        history.reattach_main()
    target = _newest_waiting(node)
    wait = RolloutWait.from_record(node.state.rollout_wait)
    if wait is not None and (target is None or history.info(target).digest != wait.digest):
        wait = None  # the recorded wave is not for the snapshot resume would take
    admission = wait.admission(now) if wait is not None else None
    if target is None:
        moved = "HEAD unchanged (nothing newer waiting)"
    elif wait is not None and admission is None:
        moved = f"HEAD unchanged (serial {wait.serial} waits: {wait.describe(now)})"
    else:
        history.recommit(target, reason="resume", admission=admission)
        moved = f"HEAD moved to serial {history.info(target).serial}"
    _record_head(node, wait=wait, admission=admission, now=now)
    return moved, converge(node, offline=offline, reason="resume")


def _record_head(
    node: Node, *, wait: RolloutWait | None, admission: Admission | None, now: float
) -> None:
    """HEAD is where resume left it; through a rollout wave, the record says which."""
    head = node.history.head_oid()
    if wait is not None and admission is not None and head is not None:
        at = format_time(now)
        node.save(entered_wave(node.state, wait=wait, admission=admission, head=head, at=at))
    else:
        node.save(expect_head(node.state, head))
