"""What ``status`` shows of agent releases (docs/status.md, ``agent``): read-only.

Where it sits: ``report.status`` calls it; it reads ``agent/state.json`` and
``agent/running.json`` and never writes, downloads or starts anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.core.agentrelease import AgentRecord
from reconciler.selfupdate.folder import RELEASE_ENV, AgentFolder

__all__ = ["agent_release_line", "agent_releases_view"]


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _running(folder: AgentFolder) -> dict[str, Any] | None:
    try:
        info = json.loads((folder.root / "running.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(info.get("pid")):
        return None
    return info


def _release(record: AgentRecord, hex_digest: str | None) -> dict[str, Any] | None:
    entry = record.entry(hex_digest)
    if hex_digest is None or entry is None:
        return None
    return {
        "digest": "sha256:" + hex_digest,
        "version": entry.version,
        "state": entry.state,
        "starts": entry.starts,
        "since": entry.since,
    }


def agent_releases_view(state_dir: Path, *, self_update: bool) -> dict[str, Any]:
    """``agent_version`` (of the watch that runs, null if none), the selected release and its
    state, the previous one, the base install's version, failed releases, recent events."""
    folder = AgentFolder.of(state_dir)
    record = folder.read()
    running = _running(folder)
    selected = _release(record, record.selected)
    base = record.base_version or (None if os.environ.get(RELEASE_ENV) else __version__)
    return {
        "agent_version": running.get("version") if running else None,
        "agent_pid": running.get("pid") if running else None,
        "selected": selected,
        "state": selected["state"] if selected else None,
        "previous": _release(record, record.previous),
        "base_version": base,
        "failed": [
            {"digest": "sha256:" + h, "version": e.version, "at": e.since, "why": e.why}
            for h, e in record.releases
            if e.state == "failed"
        ],
        "events": [dict(e) for e in record.events[-5:]],
        "self_update": self_update,
    }


def agent_release_line(agent: dict[str, Any]) -> str:
    """One line for the text status: what is selected, in which state, what failed."""
    selected = agent["selected"]
    what = (
        f"release {selected['version']} selected ({selected['state']})"
        if selected
        else f"base install {agent['base_version']} selected"
    )
    if agent["previous"]:
        what += f", previous {agent['previous']['version']}"
    if agent["failed"]:
        what += ", failed: " + ", ".join(f["version"] for f in agent["failed"])
    return what
