"""The node's small persistent record, and every way it changes.

Pure (frozen values, no clock: every time arrives as a string argument). The record keeps the
anti-rollback floor (last accepted serial and digest), the hold, the quarantine, the applied
snapshot, the last error and what ``status`` shows. The floor is also mirrored by a git ref
(``history.repo``), so deleting the record's file cannot lower it. ``history.recordfile``
reads and writes it as ``<state>/node-state.json``.

Its state machine is the functions below: intake (``fetch_succeeded``, ``fetch_failed``,
``head_moved_to``, ``entered_wave``), the apply transaction (``begin_apply`` …
``end_apply``) and the operator's controls (``rolled_back``, ``release``) each return a new
record, which the caller saves. No other module builds a changed ``NodeState`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.core.documents import format_time
from reconciler.core.rollout import Admission, RolloutWait

__all__ = [
    "FETCH_ERROR_KINDS",
    "HISTORY_KEPT",
    "AcceptedHead",
    "LastError",
    "NodeState",
    "agent_update_ran",
    "apply_failed",
    "begin_apply",
    "clear_apply_error",
    "end_apply",
    "entered_wave",
    "expect_head",
    "fetch_failed",
    "fetch_succeeded",
    "head_moved",
    "head_moved_to",
    "hold",
    "mark_applied",
    "mark_not_converged",
    "note_fault",
    "quarantine",
    "refusal_cleared",
    "refusal_noted",
    "release",
    "rolled_back",
]

# The ``LastError`` kinds intake records. Only a fetch that works clears them: converging on
# the last known snapshot says nothing about the origin.
FETCH_ERROR_KINDS = frozenset({"rejected", "unreachable"})
HISTORY_KEPT = 50  # applied digests remembered (retention of rollback targets' model blobs)


@dataclass(frozen=True)
class LastError:
    at: str  # time of the failure
    kind: str  # rejected | unreachable | apply | veto | snapshot | settings | …
    message: str  # one line


@dataclass(frozen=True)
class NodeState:
    last_serial: int = 0  # the anti-rollback floor (docs/contract.md §3.7)
    last_digest: str | None = None
    last_head_expires: str | None = None  # for `stale`
    head_etag: str | None = None  # for conditional polls
    last_fetch_ok_at: str | None = None
    expected_head: str | None = None  # the HEAD commit the reconciler itself last set
    hold: bool = False
    hold_reason: str | None = None
    quarantined: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()  # stored digests that could not become HEAD yet
    applied_digest: str | None = None
    applied_serial: int | None = None
    applied_at: str | None = None
    applied_history: tuple[str, ...] = ()  # converged digests, newest last (for retention)
    converged: bool = False
    last_error: LastError | None = None
    apply_in_progress: dict[str, Any] | None = None  # set while an apply runs (crash evidence)
    last_rejection: LastError | None = None
    # The approved agent release the ``agent-update`` hook last ran for (once per release):
    # {"version", "digest", "exit_code", "at"}.
    agent_update: dict[str, Any] | None = None
    counters: dict[str, int] = field(default_factory=dict)
    # The snapshot the newest head's rollout keeps out of HEAD, with that rollout, so status,
    # watch and the wave's opening need no fetch (docs/contract.md §8): ``RolloutWait``'s form.
    rollout_wait: dict[str, Any] | None = None
    # The last time HEAD moved through a rollout wave: {"digest", "serial", "wave", "wave_at",
    # "position", "at"} (``position`` as text, "37.21").
    rollout_entered: dict[str, Any] | None = None
    # What strict modes currently refuse (docs/security.md, "A local attacker"): a hook not
    # run ("pre-apply", "post-apply", "agent-update") or the metrics file not written
    # ("metrics"), each {"reason": one line, "at": since when}; cleared by the next pass in
    # which it is not refused.
    refused: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AcceptedHead:
    """What a fetch learnt from an accepted ``head.json``."""

    serial: int
    digest: str
    expires: str
    etag: str | None
    new_head: str | None  # the commit ``main`` moved to; None if it did not move
    waiting: bool  # stored, but may not become HEAD yet (hold, quarantine, rollout)
    # The head's rollout, while its snapshot is not HEAD (None: no rollout, or taken).
    rollout_wait: RolloutWait | None = None
    admission: Admission | None = None  # the wave through which ``main`` moved to it


def _bump(state: NodeState, counter: str) -> NodeState:
    counters = dict(state.counters)
    counters[counter] = counters.get(counter, 0) + 1
    return replace(state, counters=counters)


# ---- intake ----------------------------------------------------------------------------------


def fetch_succeeded(state: NodeState, *, at: str, head: AcceptedHead | None = None) -> NodeState:
    """A fetch worked: clear what the last failed fetch recorded (not apply errors).

    With ``head`` (not for a ``304 Not Modified``): raise the floor, remember the head's
    expiry and ETag, the HEAD the agent set, and a digest that has to wait.
    """
    error = state.last_error
    state = replace(
        state,
        last_fetch_ok_at=at,
        last_rejection=None,
        last_error=None if error is not None and error.kind in FETCH_ERROR_KINDS else error,
    )
    if head is None:
        return state
    state = _rollout_of_head(state, head, at=at)
    waits = head.waiting and head.digest not in state.waiting
    return replace(
        state,
        last_serial=max(head.serial, state.last_serial),
        last_digest=head.digest,
        last_head_expires=head.expires,
        head_etag=head.etag,
        expected_head=head.new_head if head.new_head is not None else state.expected_head,
        waiting=(*state.waiting, head.digest) if waits else state.waiting,
    )


def _rollout_of_head(state: NodeState, head: AcceptedHead, *, at: str) -> NodeState:
    """The newest head's rollout decides: it replaces the one recorded before.

    A head naming another digest has a higher serial (docs/contract.md §3.7), so a snapshot
    that waited for its wave under the old head is no longer a candidate and leaves the
    waiting list; so does the head's own snapshot once ``main`` moved to it.
    """
    waiting = state.waiting
    previous = RolloutWait.from_record(state.rollout_wait)
    if previous is not None and previous.digest != head.digest:
        waiting = tuple(d for d in waiting if d != previous.digest)
    if head.new_head is not None:
        waiting = tuple(d for d in waiting if d != head.digest)
    entered = state.rollout_entered
    if head.admission is not None:
        entered = _entered(head.digest, head.serial, head.admission, at=at)
    wait = head.rollout_wait.to_record() if head.rollout_wait is not None else None
    return replace(state, waiting=waiting, rollout_wait=wait, rollout_entered=entered)


def _entered(digest: str, serial: int, admission: Admission, *, at: str) -> dict[str, Any]:
    return {
        "digest": digest,
        "serial": serial,
        "wave": admission.wave,
        "wave_at": format_time(admission.wave_at),
        "position": str(admission.position),
        "at": at,
    }


def entered_wave(
    state: NodeState, *, wait: RolloutWait, admission: Admission, head: str, at: str
) -> NodeState:
    """``main`` moved to the snapshot ``wait`` held back, its wave open, without a new head."""
    return replace(
        state,
        expected_head=head,
        waiting=tuple(d for d in state.waiting if d != wait.digest),
        rollout_wait=None,
        rollout_entered=_entered(wait.digest, wait.serial, admission, at=at),
    )


def fetch_failed(state: NodeState, *, error: LastError) -> NodeState:
    """A fetch was rejected or could not reach the origin; rejections are also counted."""
    if error.kind not in FETCH_ERROR_KINDS:
        raise ValueError(f"not a fetch error kind: {error.kind!r}")
    state = replace(state, last_error=error)
    if error.kind == "rejected":
        # Counted for reconciler_fetch_rejections_total (docs/status.md).
        state = _bump(replace(state, last_rejection=error), "rejections")
    return state


def head_moved(state: NodeState, head: str | None) -> bool:
    """Whether HEAD is not where the agent last put it (and no hold covers that already)."""
    expected = state.expected_head
    return not (head is None or expected is None or head == expected or state.hold)


def head_moved_to(state: NodeState, *, head: str, by_reconciler: bool) -> NodeState:
    """HEAD moved: the agent's own move it had no time to record, or an operator's (a hold)."""
    if by_reconciler:
        return expect_head(state, head)
    return hold(state, reason=f"HEAD moved with git to {head[:12]}")


def expect_head(state: NodeState, head: str | None) -> NodeState:
    return replace(state, expected_head=head)


# ---- the apply transaction -------------------------------------------------------------------


def begin_apply(
    state: NodeState, *, commit: str, digest: str, serial: int, reason: str, started_at: str
) -> NodeState:
    """An attempt starts (step 3): not converged, and the mark a crash leaves behind."""
    marker = {
        "commit": commit,
        "digest": digest,
        "serial": serial,
        "reason": reason,
        "started_at": started_at,
    }
    return replace(state, converged=False, apply_in_progress=marker)


def end_apply(state: NodeState) -> NodeState:
    """The attempt has its receipt (its own, or ``interrupted`` written by the next pass)."""
    return replace(state, apply_in_progress=None)


def mark_applied(state: NodeState, *, digest: str, serial: int, at: str) -> NodeState:
    """Converged on ``digest``: remembered in the applied history, apply errors cleared."""
    history = [d for d in state.applied_history if d != digest] + [digest]
    error = state.last_error
    return replace(
        state,
        applied_digest=digest,
        applied_serial=serial,
        applied_at=at,
        applied_history=tuple(history[-HISTORY_KEPT:]),
        converged=True,
        last_error=error if error is not None and error.kind in FETCH_ERROR_KINDS else None,
    )


def mark_not_converged(state: NodeState, *, error: LastError) -> NodeState:
    """What runs is not (known to be) HEAD, for the reason ``error`` gives."""
    return replace(state, converged=False, last_error=error)


def apply_failed(
    state: NodeState, *, error: LastError, counted: bool, quarantined: str | None
) -> NodeState:
    """An attempt failed: not converged; counted in ``apply_failures``; maybe quarantined."""
    state = _bump(state, "apply_failures") if counted else state
    if quarantined is not None:
        state = quarantine(state, quarantined)
    return mark_not_converged(state, error=error)


def note_fault(state: NodeState, *, error: LastError) -> NodeState:
    """Why the node rolled back, kept visible after the rollback's own success cleared it."""
    return replace(state, last_error=error)


def clear_apply_error(state: NodeState) -> NodeState:
    """A converged pass clears an apply error; the same record if there is none to clear."""
    if state.last_error is None or state.last_error.kind != "apply":
        return state
    return replace(state, last_error=None)


def agent_update_ran(
    state: NodeState, *, version: str, digest: str | None, exit_code: int | None, at: str
) -> NodeState:
    """The ``agent-update`` hook ran for this release (whatever its exit code): once only."""
    done = {"version": version, "digest": digest, "exit_code": exit_code, "at": at}
    return replace(state, agent_update=done)


def refusal_noted(state: NodeState, *, what: str, reason: str, at: str) -> NodeState:
    """Strict modes refused ``what`` this pass. The same reason again keeps its first time
    and returns the same record, so a refusal that lasts does not rewrite the file."""
    known = state.refused.get(what)
    if known is not None and known.get("reason") == reason:
        return state
    return replace(state, refused={**state.refused, what: {"reason": reason, "at": at}})


def refusal_cleared(state: NodeState, *, what: str) -> NodeState:
    """``what`` was not refused this pass (it ran, or is gone); the same record if it was
    not refused before either."""
    if what not in state.refused:
        return state
    return replace(state, refused={k: v for k, v in state.refused.items() if k != what})


# ---- quarantine, hold, rollback, resume -----------------------------------------------------


def quarantine(state: NodeState, digest: str) -> NodeState:
    return replace(state, quarantined=tuple(dict.fromkeys((*state.quarantined, digest))))


def hold(state: NodeState, *, reason: str) -> NodeState:
    """Stop automatic advance (an operator's rollback, or HEAD moved with stock git)."""
    return replace(state, hold=True, hold_reason=reason)


def rolled_back(state: NodeState, *, target: str, head: str | None, manual: bool) -> NodeState:
    """HEAD is a new commit of ``target``. An operator's rollback holds, and lifts the
    quarantine of the target they chose; the automatic one does neither."""
    state = expect_head(_bump(state, "rollbacks"), head)
    if not manual:
        return state
    state = replace(state, quarantined=tuple(d for d in state.quarantined if d != target))
    return hold(state, reason=f"rollback to {target[:19]}…")


def release(state: NodeState) -> NodeState:
    """``reconcile resume``: lift the hold and every quarantine; nothing waits any more but
    the snapshot the newest head's rollout names, which ``resume`` takes only if this node's
    wave has opened (it respects rollouts)."""
    wait = RolloutWait.from_record(state.rollout_wait)
    waiting = tuple(d for d in state.waiting if wait is not None and d == wait.digest)
    return replace(state, hold=False, hold_reason=None, quarantined=(), waiting=waiting)
