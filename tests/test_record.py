"""core.record: each transition of the node record, as a pure function (no files, no clock).

Every case states the record before, the transition, and the fields that must differ
afterwards; every other field must be exactly as before, so a transition that touches more
than it should fails too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import pytest

from reconciler.core import record
from reconciler.core.record import AcceptedHead, LastError, NodeState
from reconciler.core.rollout import Admission, Position, Rollout, RolloutWait, Wave

AT = "2026-01-02T03:04:05Z"
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
FETCH_ERROR = LastError(at="earlier", kind="unreachable", message="origin down")
REJECTED = LastError(at=AT, kind="rejected", message="rejected head.json: bad signature")
APPLY_ERROR = LastError(at="earlier", kind="apply", message="podman down")
VETO = LastError(at=AT, kind="veto", message="pre-apply vetoed serial 3")

BUSY = NodeState(
    last_serial=7,
    last_digest=D2,
    expected_head="c0ffee",
    quarantined=(D3,),
    waiting=(D3,),
    applied_digest=D1,
    applied_serial=6,
    applied_history=(D1,),
    converged=True,
    counters={"rollbacks": 1},
)

# A snapshot (D1, serial 9) that waits for wave 2 of its rollout; its replacement (D2, 10).
ROLLOUT = Rollout(waves=(Wave(at=1000, percent=5), Wave(at=2000, percent=100)), salt="s")
WAIT_D1 = RolloutWait(digest=D1, serial=9, position=Position(3721), rollout=ROLLOUT)
WAIT_D2 = RolloutWait(digest=D2, serial=10, position=Position(3721), rollout=ROLLOUT)
WAVE_2 = Admission(wave=2, wave_at=2000, position=Position(3721))
ENTERED_D1 = {
    "digest": D1,
    "serial": 9,
    "wave": 2,
    "wave_at": "1970-01-01T00:33:20Z",
    "position": "37.21",
    "at": AT,
}
WAITING = replace(BUSY, waiting=(D3, D1), rollout_wait=WAIT_D1.to_record())

Transition = Callable[[NodeState], NodeState]


def _plain(state: NodeState) -> dict[str, Any]:
    """The record as its file holds it (tuples as lists, errors as objects)."""
    plain: dict[str, Any] = json.loads(json.dumps(asdict(state)))
    return plain


def _changes(before: NodeState, after: NodeState) -> dict[str, Any]:
    old, new = _plain(before), _plain(after)
    return {key: new[key] for key in new if new[key] != old[key]}


CASES: list[tuple[str, NodeState, Transition, dict[str, Any]]] = [
    (
        "fetch-304-clears-fetch-error-keeps-floor",
        replace(BUSY, last_error=FETCH_ERROR, last_rejection=REJECTED),
        lambda s: record.fetch_succeeded(s, at=AT),
        {"last_fetch_ok_at": AT, "last_error": None, "last_rejection": None},
    ),
    (
        "fetch-keeps-apply-error",
        replace(BUSY, last_error=APPLY_ERROR),
        lambda s: record.fetch_succeeded(s, at=AT),
        {"last_fetch_ok_at": AT},
    ),
    (
        "fetch-new-head-raises-floor-and-expects-head",
        BUSY,
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=9, digest=D1, expires="later", etag='"e"', new_head="beef", waiting=False
            ),
        ),
        {
            "last_fetch_ok_at": AT,
            "last_serial": 9,
            "last_digest": D1,
            "last_head_expires": "later",
            "head_etag": '"e"',
            "expected_head": "beef",
        },
    ),
    (
        "fetch-waiting-head-is-listed-once-floor-never-lowers",
        replace(BUSY, waiting=()),
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=3, digest=D3, expires="later", etag=None, new_head=None, waiting=True
            ),
        ),
        {"last_fetch_ok_at": AT, "last_digest": D3, "last_head_expires": "later", "waiting": [D3]},
    ),
    (
        "fetch-waiting-head-already-listed",
        BUSY,
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=8, digest=D3, expires="x", etag=None, new_head=None, waiting=True
            ),
        ),
        {"last_fetch_ok_at": AT, "last_serial": 8, "last_digest": D3, "last_head_expires": "x"},
    ),
    (
        "fetch-head-whose-rollout-keeps-it-out-waits-with-the-rollout",
        replace(BUSY, waiting=()),
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=9,
                digest=D1,
                expires="later",
                etag='"e"',
                new_head=None,
                waiting=True,
                rollout_wait=WAIT_D1,
            ),
        ),
        {
            "last_fetch_ok_at": AT,
            "last_serial": 9,
            "last_digest": D1,
            "last_head_expires": "later",
            "head_etag": '"e"',
            "waiting": [D1],
            "rollout_wait": WAIT_D1.to_record(),
        },
    ),
    (
        "fetch-higher-serial-supersedes-the-snapshot-waiting-for-its-wave",
        WAITING,
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=10,
                digest=D2,
                expires="later",
                etag=None,
                new_head=None,
                waiting=True,
                rollout_wait=WAIT_D2,
            ),
        ),
        {
            "last_fetch_ok_at": AT,
            "last_serial": 10,
            "last_head_expires": "later",
            "waiting": [D3, D2],
            "rollout_wait": WAIT_D2.to_record(),
        },
    ),
    (
        "fetch-through-the-wave-records-the-entry",
        WAITING,
        lambda s: record.fetch_succeeded(
            s,
            at=AT,
            head=AcceptedHead(
                serial=9,
                digest=D1,
                expires="later",
                etag=None,
                new_head="beef",
                waiting=False,
                admission=WAVE_2,
            ),
        ),
        {
            "last_fetch_ok_at": AT,
            "last_serial": 9,
            "last_digest": D1,
            "last_head_expires": "later",
            "expected_head": "beef",
            "waiting": [D3],
            "rollout_wait": None,
            "rollout_entered": ENTERED_D1,
        },
    ),
    (
        "entered-wave-without-a-new-head",
        WAITING,
        lambda s: record.entered_wave(s, wait=WAIT_D1, admission=WAVE_2, head="beef", at=AT),
        {
            "expected_head": "beef",
            "waiting": [D3],
            "rollout_wait": None,
            "rollout_entered": ENTERED_D1,
        },
    ),
    (
        "fetch-rejected-counts-the-rejection",
        BUSY,
        lambda s: record.fetch_failed(s, error=REJECTED),
        {
            "last_error": asdict(REJECTED),
            "last_rejection": asdict(REJECTED),
            "counters": {"rollbacks": 1, "rejections": 1},
        },
    ),
    (
        "fetch-unreachable-is-not-a-rejection",
        BUSY,
        lambda s: record.fetch_failed(s, error=FETCH_ERROR),
        {"last_error": asdict(FETCH_ERROR)},
    ),
    (
        "head-moved-by-the-agent-itself-is-expected",
        BUSY,
        lambda s: record.head_moved_to(s, head="abcdef0123456789", by_reconciler=True),
        {"expected_head": "abcdef0123456789"},
    ),
    (
        "head-moved-with-git-holds",
        BUSY,
        lambda s: record.head_moved_to(s, head="abcdef0123456789", by_reconciler=False),
        {"hold": True, "hold_reason": "HEAD moved with git to abcdef012345"},
    ),
    (
        "begin-apply-marks-in-progress-not-converged",
        BUSY,
        lambda s: record.begin_apply(
            s, commit="c1", digest=D2, serial=7, reason="fetch", started_at=AT
        ),
        {
            "converged": False,
            "apply_in_progress": {
                "commit": "c1",
                "digest": D2,
                "serial": 7,
                "reason": "fetch",
                "started_at": AT,
            },
        },
    ),
    (
        "end-apply-clears-the-mark-only",
        replace(BUSY, apply_in_progress={"commit": "c1"}, converged=False),
        record.end_apply,
        {"apply_in_progress": None},
    ),
    (
        "mark-applied-clears-apply-error-appends-history",
        replace(BUSY, converged=False, last_error=APPLY_ERROR),
        lambda s: record.mark_applied(s, digest=D2, serial=7, at=AT),
        {
            "applied_digest": D2,
            "applied_serial": 7,
            "applied_at": AT,
            "applied_history": [D1, D2],
            "converged": True,
            "last_error": None,
        },
    ),
    (
        "mark-applied-keeps-a-fetch-error-and-moves-digest-to-the-end",
        replace(BUSY, applied_history=(D2, D1), last_error=FETCH_ERROR),
        lambda s: record.mark_applied(s, digest=D2, serial=7, at=AT),
        {"applied_digest": D2, "applied_serial": 7, "applied_at": AT, "applied_history": [D1, D2]},
    ),
    (
        "mark-not-converged",
        BUSY,
        lambda s: record.mark_not_converged(s, error=APPLY_ERROR),
        {"converged": False, "last_error": asdict(APPLY_ERROR)},
    ),
    (
        "veto-is-not-counted",
        replace(BUSY, converged=False),
        lambda s: record.apply_failed(s, error=VETO, counted=False, quarantined=None),
        {"last_error": asdict(VETO)},
    ),
    (
        "transient-failure-is-counted-not-quarantined",
        BUSY,
        lambda s: record.apply_failed(s, error=APPLY_ERROR, counted=True, quarantined=None),
        {
            "converged": False,
            "last_error": asdict(APPLY_ERROR),
            "counters": {"rollbacks": 1, "apply_failures": 1},
        },
    ),
    (
        "snapshot-fault-is-counted-and-quarantined-once",
        BUSY,
        lambda s: record.apply_failed(s, error=VETO, counted=True, quarantined=D3),
        {
            "converged": False,
            "last_error": asdict(VETO),
            "counters": {"rollbacks": 1, "apply_failures": 1},
        },
    ),
    (
        "snapshot-fault-quarantines-a-new-digest",
        BUSY,
        lambda s: record.apply_failed(s, error=VETO, counted=True, quarantined=D2),
        {
            "converged": False,
            "last_error": asdict(VETO),
            "quarantined": [D3, D2],
            "counters": {"rollbacks": 1, "apply_failures": 1},
        },
    ),
    (
        "note-fault-keeps-convergence",
        BUSY,
        lambda s: record.note_fault(s, error=VETO),
        {"last_error": asdict(VETO)},
    ),
    (
        "clear-apply-error",
        replace(BUSY, last_error=APPLY_ERROR),
        record.clear_apply_error,
        {"last_error": None},
    ),
    (
        "clear-apply-error-leaves-a-fetch-error",
        replace(BUSY, last_error=FETCH_ERROR),
        record.clear_apply_error,
        {},
    ),
    (
        "agent-update-ran",
        BUSY,
        lambda s: record.agent_update_ran(s, version="9.9", digest=D1, exit_code=3, at=AT),
        {"agent_update": {"version": "9.9", "digest": D1, "exit_code": 3, "at": AT}},
    ),
    (
        "refusal-noted",
        BUSY,
        lambda s: record.refusal_noted(s, what="post-apply", reason="hooks folder x", at=AT),
        {"refused": {"post-apply": {"reason": "hooks folder x", "at": AT}}},
    ),
    (
        "refusal-noted-again-keeps-its-first-time-a-new-reason-replaces-it",
        replace(BUSY, refused={"metrics": {"reason": "a", "at": "earlier"}}),
        lambda s: record.refusal_noted(
            record.refusal_noted(s, what="metrics", reason="a", at=AT),
            what="pre-apply",
            reason="b",
            at=AT,
        ),
        {
            "refused": {
                "metrics": {"reason": "a", "at": "earlier"},
                "pre-apply": {"reason": "b", "at": AT},
            }
        },
    ),
    (
        "refusal-cleared-leaves-the-others",
        replace(BUSY, refused={"metrics": {"reason": "a", "at": AT}, "post-apply": {}}),
        lambda s: record.refusal_cleared(s, what="post-apply"),
        {"refused": {"metrics": {"reason": "a", "at": AT}}},
    ),
    (
        "automatic-rollback-neither-holds-nor-lifts",
        BUSY,
        lambda s: record.rolled_back(s, target=D3, head="new", manual=False),
        {"expected_head": "new", "counters": {"rollbacks": 2}},
    ),
    (
        "manual-rollback-holds-and-lifts-its-targets-quarantine",
        BUSY,
        lambda s: record.rolled_back(s, target=D3, head="new", manual=True),
        {
            "expected_head": "new",
            "counters": {"rollbacks": 2},
            "hold": True,
            "hold_reason": f"rollback to {D3[:19]}…",
            "quarantined": [],
        },
    ),
    (
        "release-lifts-hold-quarantine-and-waiting",
        replace(BUSY, hold=True, hold_reason="rollback"),
        record.release,
        {"hold": False, "hold_reason": None, "quarantined": [], "waiting": []},
    ),
    (
        "release-keeps-waiting-what-its-wave-keeps-out",
        replace(WAITING, hold=True, hold_reason="rollback"),
        record.release,
        {"hold": False, "hold_reason": None, "quarantined": [], "waiting": [D1]},
    ),
    (
        "quarantine-twice-is-once",
        BUSY,
        lambda s: record.quarantine(record.quarantine(s, D2), D2),
        {"quarantined": [D3, D2]},
    ),
]


@pytest.mark.parametrize(
    ("before", "transition", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_transition_changes_exactly_its_fields(
    before: NodeState, transition: Transition, expected: dict[str, Any]
) -> None:
    original = _plain(before)
    after = transition(before)

    assert _changes(before, after) == expected
    assert _plain(before) == original, "the transition changed its input"
    assert _plain(transition(before)) == _plain(after), "not a function of its input alone"


def test_the_applied_history_keeps_the_newest_fifty() -> None:
    state = NodeState()
    for n in range(record.HISTORY_KEPT + 5):
        state = record.mark_applied(state, digest=f"sha256:{n}", serial=n, at=AT)

    assert len(state.applied_history) == record.HISTORY_KEPT
    assert state.applied_history[0] == "sha256:5"
    assert state.applied_history[-1] == f"sha256:{record.HISTORY_KEPT + 4}"


def test_clear_apply_error_returns_the_same_record_when_there_is_nothing_to_clear() -> None:
    # The converged no-op pass relies on it to skip rewriting node-state.json.
    assert record.clear_apply_error(BUSY) is BUSY


def test_a_lasting_refusal_and_clearing_nothing_return_the_same_record() -> None:
    # A refusal that lasts, or none to clear, must not rewrite node-state.json every pass.
    refused = record.refusal_noted(BUSY, what="metrics", reason="a", at="earlier")
    assert record.refusal_noted(refused, what="metrics", reason="a", at=AT) is refused
    assert record.refusal_cleared(BUSY, what="metrics") is BUSY


def test_a_fetch_failure_must_be_of_a_fetch_kind() -> None:
    with pytest.raises(ValueError, match="apply"):
        record.fetch_failed(BUSY, error=APPLY_ERROR)


@pytest.mark.parametrize(
    ("state", "head", "moved"),
    [
        (BUSY, "c0ffee", False),
        (BUSY, None, False),
        (BUSY, "other", True),
        (replace(BUSY, hold=True), "other", False),
        (replace(BUSY, expected_head=None), "other", False),
    ],
    ids=["where-expected", "no-head", "moved", "held-already", "never-set"],
)
def test_head_moved(state: NodeState, head: str | None, moved: bool) -> None:
    assert record.head_moved(state, head) is moved


def test_a_rollout_wait_reads_back_from_its_record_form_and_an_unreadable_one_is_none() -> None:
    assert RolloutWait.from_record(WAIT_D1.to_record()) == WAIT_D1
    assert RolloutWait.from_record(json.loads(json.dumps(WAIT_D1.to_record()))) == WAIT_D1
    broken = {**WAIT_D1.to_record(), "position": 10000}
    assert RolloutWait.from_record(broken) is None
    assert RolloutWait.from_record({"digest": D1}) is None
    assert RolloutWait.from_record(None) is None


def test_the_fetch_error_kinds_are_what_intake_records() -> None:
    assert {"rejected", "unreachable"} == record.FETCH_ERROR_KINDS
