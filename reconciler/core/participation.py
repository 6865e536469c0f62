"""What the runtime is told (docs/contract.md §2): the files under ``runtime/``, computed purely.

Pure: a snapshot and the node's own facts (network, VRAM, opt-outs) in, file contents out.
The VRAM figure is ``core.gpus.GpuFacts.vram_mib``: discovered through NVML (the largest
single GPU) or the operator's ``vram_mib`` setting; ``None`` meets no VRAM floor.
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
from reconciler.core.gpus import GpuFacts

__all__ = ["ParticipationView", "participation", "runtime_files"]


@dataclass(frozen=True)
class ParticipationView:
    modes: tuple[str, ...]
    subclouds: tuple[str, ...]  # ids this node takes part in
    excluded: tuple[tuple[str, str], ...]  # (id, why) for enabled subclouds left out
    for_vram: tuple[str, ...] = ()  # the excluded ids left out because of VRAM alone


def participation(
    snapshot: Snapshot, *, vram_mib: int | None, opt_out: Sequence[str]
) -> ParticipationView:
    models = {m.id: m for m in snapshot.models}
    joined: list[str] = []
    excluded: list[tuple[str, str]] = []
    for_vram: list[str] = []
    node_vram = vram_mib if vram_mib is not None else 0
    for sub in snapshot.participation.subclouds:
        if not sub.enabled:
            continue
        if sub.id in opt_out:
            excluded.append((sub.id, "opted out by the operator"))
            continue
        if sub.min_vram_mib is not None and sub.min_vram_mib > node_vram:
            excluded.append((sub.id, f"needs {sub.min_vram_mib} MiB of VRAM, node has {node_vram}"))
            for_vram.append(sub.id)
            continue
        absent = [mid for mid in sub.models if mid not in models]
        too_big = [
            mid
            for mid in sub.models
            if mid in models and (models[mid].min_vram_mib or 0) > node_vram
        ]
        if absent or too_big:
            vram = f" (VRAM: node has {node_vram} MiB)" if too_big else ""
            excluded.append((sub.id, f"cannot serve {', '.join(absent + too_big)}{vram}"))
            if not absent:
                for_vram.append(sub.id)
            continue
        joined.append(sub.id)
    modes = tuple(m for m in snapshot.participation.modes if m == snapshot.network)
    return ParticipationView(
        modes=modes, subclouds=tuple(joined), excluded=tuple(excluded), for_vram=tuple(for_vram)
    )


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def runtime_files(
    snapshot: Snapshot,
    *,
    config_digest: str,
    view: ParticipationView,
    gpus: GpuFacts | None = None,
) -> dict[str, bytes]:
    """File name (under ``runtime/``) → contents. ``jobs.json`` is what ``notify`` is about.

    ``participation.json`` also carries the GPU facts the decision used (``gpus``), so that a
    runtime sees why it was given the subclouds it was."""
    jobs = {
        "max_tokens": snapshot.jobs.max_tokens,
        "max_queue": snapshot.jobs.max_queue,
        "timeout_s": snapshot.jobs.timeout_s,
        "heartbeat_s": snapshot.ttl.heartbeat_s,
    }
    part: dict[str, Any] = {
        "network": snapshot.network,
        "modes": list(view.modes),
        "subclouds": list(view.subclouds),
        "excluded": [{"id": i, "why": w} for i, w in view.excluded],
        "excluded_for_vram": list(view.for_vram),
    }
    if gpus is not None:
        # Without the note: a changing "why none" is not worth notifying a runtime about.
        part["gpus"] = {k: v for k, v in gpus.to_json().items() if k != "note"}
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
