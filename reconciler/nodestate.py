"""The node's small persistent record: what git history must not be able to change.

Edge module (one JSON file, ``<state>/node-state.json``, replaced atomically). It keeps the
anti-rollback floor (last accepted serial and digest), the hold, the quarantine, the applied
snapshot, the last error and what ``status`` shows. The floor is also mirrored by a git ref
(see ``history``), so deleting this file cannot lower it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.atomic import write_atomic

__all__ = ["LastError", "NodeState", "load_node_state", "save_node_state"]


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


def load_node_state(path: Path) -> NodeState:
    try:
        raw: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return NodeState()
    known = {k: v for k, v in raw.items() if k in NodeState.__dataclass_fields__}
    for key in ("quarantined", "applied_history", "waiting"):
        if key in known:
            known[key] = tuple(known[key])
    for key in ("last_error", "last_rejection"):
        if known.get(key):
            known[key] = LastError(**known[key])
    return NodeState(**known)


def save_node_state(path: Path, state: NodeState) -> None:
    data = json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"
    write_atomic(path, data.encode("utf-8"))
