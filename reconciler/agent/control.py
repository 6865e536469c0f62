"""Operator control of what the node converges to: manual rollback, hold, resume.

Edge module (git, node record), called by the CLI with the agent lock held. Rollback makes an
earlier snapshot HEAD again as a new ``Reason: rollback`` commit and holds automatic advance;
resume lifts the hold and every quarantine and moves HEAD to the newest snapshot stored while
held (``Reason: resume``). Both then converge through ``apply``.
"""

from __future__ import annotations

from reconciler.apply.transaction import ConvergeOutcome, converge, rollback_to
from reconciler.core.errors import HistoryError
from reconciler.core.record import expect_head, release
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


def resume(node: Node, *, offline: bool) -> tuple[str, ConvergeOutcome]:
    """Lift hold and quarantine; advance to the newest waiting snapshot; converge."""
    node.save(release(node.state))
    history = node.history
    if history.head_is_detached():
        history.reattach_main()
    target = _newest_waiting(node)
    if target is not None:
        history.recommit(target, reason="resume")
        moved = f"HEAD moved to serial {history.info(target).serial}"
    else:
        moved = "HEAD unchanged (nothing newer waiting)"
    node.save(expect_head(node.state, history.head_oid()))
    return moved, converge(node, offline=offline, reason="resume")
