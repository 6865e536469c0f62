"""Step 0 of the apply: clean up after a crash before anything else is decided.

Where it sits: first thing of every converge pass, with the agent lock held (no other writer
can be mid-write). A HEAD moved with stock git becomes a hold (intake's rule); an attempt the
record says was in progress gets its receipt now; temporaries of interrupted atomic writes
and libgit2 scratch objects are deleted. It never touches containers or models.
"""

from __future__ import annotations

import logging

from reconciler.apply.edges import Clock
from reconciler.apply.receipt import Receipt, sign_and_note
from reconciler.core.documents import format_time
from reconciler.core.outcome import ApplyResult
from reconciler.core.record import end_apply
from reconciler.history.node import Node
from reconciler.intake.fetch import note_moved_head

__all__ = ["record_interrupted", "recover", "sweep_temporaries"]

log = logging.getLogger("reconciler")


def recover(node: Node, *, clock: Clock) -> None:
    note_moved_head(node)
    record_interrupted(node, clock=clock)
    sweep_temporaries(node)


def record_interrupted(node: Node, *, clock: Clock) -> None:
    """A previous attempt died mid-apply (SIGKILL, power): say so in a receipt, once."""
    state = node.state
    marker = state.apply_in_progress
    if not marker:
        return
    oid = marker.get("commit")
    # The attempt got as far as recording convergence and died before its receipt: say
    # what happened (it converged), not that it was cut short.
    finished = state.converged and state.applied_digest == marker.get("digest")
    if oid:
        receipt = Receipt(
            commit=oid,
            config_digest=marker.get("digest"),
            serial=marker.get("serial"),
            result=ApplyResult.CONVERGED if finished else ApplyResult.INTERRUPTED,
            reason=marker.get("reason"),
            started_at=marker.get("started_at"),
            finished_at=format_time(clock()),
            error=None
            if finished
            else "interrupted: the agent stopped during this apply; the next pass resumed it",
            note="the agent stopped after converging, before writing this receipt"
            if finished
            else None,
        )
        sign_and_note(node.history, receipt, node_key=node.paths.node_key)
    node.save(end_apply(node.state))


def sweep_temporaries(node: Node) -> None:
    """Remove files ``write_atomic`` left behind when a process died between write and rename.

    The model store cleans its own scratch folders (``gc``); its index is written the same
    way, in ``models/``.
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
