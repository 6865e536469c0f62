"""The node's small persistent record: what git history must not be able to change.

Pure (a frozen value). It keeps the anti-rollback floor (last accepted serial and digest), the
hold, the quarantine, the applied snapshot, the last error and what ``status`` shows. The floor
is also mirrored by a git ref (``history.repo``), so deleting the record's file cannot lower
it. ``history.recordfile`` reads and writes it as ``<state>/node-state.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["LastError", "NodeState"]


@dataclass(frozen=True)
class LastError:
    at: str  # time of the failure
    kind: str  # rejected | unreachable | apply | settings | …
    message: str  # one line


@dataclass(frozen=True)
class NodeState:
    last_serial: int = 0  # the anti-rollback floor (contract §3.7)
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

    def with_error(self, error: LastError | None) -> NodeState:
        return replace(self, last_error=error)

    def bump(self, counter: str) -> NodeState:
        counters = dict(self.counters)
        counters[counter] = counters.get(counter, 0) + 1
        return replace(self, counters=counters)
