"""The node record's file, ``<state>/node-state.json``, replaced atomically.

Edge module (one file). Unknown keys written by another version are ignored on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reconciler.core.record import LastError, NodeState
from reconciler.disk.atomic import write_atomic

__all__ = ["load_node_state", "save_node_state"]


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
