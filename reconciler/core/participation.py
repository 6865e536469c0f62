"""What the runtime is told (docs/contract.md §2): the files under ``runtime/``, computed purely.

Pure: a snapshot and the node's own facts (network, VRAM, opt-outs) in, file contents out.
Writing them is the apply layer's job. Job parameters are deliberately not part of any
container's spec hash: a change here rewrites ``jobs.json`` and notifies the runtime instead of
replacing its container.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.core.documents import Snapshot

__all__ = ["ParticipationView", "participation", "runtime_files"]


@dataclass(frozen=True)
class ParticipationView:
    modes: tuple[str, ...]
    subclouds: tuple[str, ...]  # ids this node takes part in
    excluded: tuple[tuple[str, str], ...]  # (id, why) for enabled subclouds left out


def participation(
    snapshot: Snapshot, *, vram_mib: int | None, opt_out: Sequence[str]
) -> ParticipationView:
    models = {m.id: m for m in snapshot.models}
    joined: list[str] = []
    excluded: list[tuple[str, str]] = []
    node_vram = vram_mib if vram_mib is not None else 0
    for sub in snapshot.participation.subclouds:
        if not sub.enabled:
            continue
        if sub.id in opt_out:
            excluded.append((sub.id, "opted out by the operator"))
            continue
        if sub.min_vram_mib is not None and sub.min_vram_mib > node_vram:
            excluded.append((sub.id, f"needs {sub.min_vram_mib} MiB of VRAM, node has {node_vram}"))
            continue
        unmet = [
            mid
            for mid in sub.models
            if mid not in models or (models[mid].min_vram_mib or 0) > node_vram
        ]
        if unmet:
            excluded.append((sub.id, f"cannot serve {', '.join(unmet)}"))
            continue
        joined.append(sub.id)
    modes = tuple(m for m in snapshot.participation.modes if m == snapshot.network)
    return ParticipationView(modes=modes, subclouds=tuple(joined), excluded=tuple(excluded))


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def runtime_files(
    snapshot: Snapshot, *, config_digest: str, view: ParticipationView
) -> dict[str, bytes]:
    """File name (under ``runtime/``) → contents. ``jobs.json`` is what ``notify`` is about."""
    jobs = {
        "max_tokens": snapshot.jobs.max_tokens,
        "max_queue": snapshot.jobs.max_queue,
        "timeout_s": snapshot.jobs.timeout_s,
        "heartbeat_s": snapshot.ttl.heartbeat_s,
    }
    part = {
        "network": snapshot.network,
        "modes": list(view.modes),
        "subclouds": list(view.subclouds),
        "excluded": [{"id": i, "why": w} for i, w in view.excluded],
    }
    models = [
        {
            "id": m.id,
            "name": m.name,
            "version": m.version,
            "runtime": m.runtime,
            "tasks": list(m.tasks),
            "min_vram_mib": m.min_vram_mib,
        }
        for m in snapshot.models
    ]
    env_lines = [
        f"RECONCILE_CONFIG_DIGEST={config_digest}",
        f"RECONCILE_SERIAL={snapshot.serial}",
        f"RECONCILE_NETWORK={snapshot.network}",
        f"RECONCILE_HEARTBEAT_S={snapshot.ttl.heartbeat_s}",
    ]
    return {
        "jobs.json": _dump(jobs),
        "participation.json": _dump(part),
        "models.json": _dump({"models": models}),
        "updates.json": _dump(snapshot.updates),
        "env": ("\n".join(env_lines) + "\n").encode("utf-8"),
    }
