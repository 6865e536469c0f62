"""What a node offers to its peers while ``watch`` runs: the verified blobs of HEAD and of the
snapshots kept for rollback (``keep_applied``), and nothing else.

Where it sits: the watch loop calls ``seed_what_we_keep`` after every cycle (outside the agent
lock: it only reads the history) and ``stop_seeding`` when it stops. The swarm itself is
``reconciler.models.swarm``; this module only decides which files, from the history.

What it may not do: raise (sharing is never worth a failed cycle: a problem is logged), or
offer a file the snapshots do not name (the swarm offers only blobs already in the store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from reconciler.core.documents import ModelFile, Snapshot, loads_strict
from reconciler.core.errors import ReconcilerError
from reconciler.history.node import Node
from reconciler.models.layout import StoreLayout
from reconciler.models.swarm import (
    STATUS_NAME,
    SwarmOptions,
    close_shared_swarm,
    shared_swarm,
)

__all__ = ["seed_what_we_keep", "stop_seeding"]

log = logging.getLogger("reconciler")


def seed_what_we_keep(node: Node) -> int | None:
    """Offer the blobs of HEAD and the retained snapshots; how many are offered, or None
    when the node does not take part (p2p off, or the swarm unavailable)."""
    options = SwarmOptions.of(node.settings)
    if options is None:
        close_shared_swarm()  # p2p turned off by a settings reload
        return None
    layout = StoreLayout.of(node.paths)
    swarm = shared_swarm(options, status_path=layout.root / STATUS_NAME)
    if swarm is None:
        return None
    try:
        return swarm.seed(_kept_files(node), layout.blob_dir)
    except (ReconcilerError, OSError, RuntimeError) as exc:
        log.warning("swarm: cannot offer the kept blobs: %s", exc)
        return None


def stop_seeding() -> None:
    close_shared_swarm()


def _kept_files(node: Node) -> Iterator[ModelFile]:
    history = node.history
    oids: list[str] = []
    head = history.head_oid()
    if head is not None:
        oids.append(head)
    kept = node.settings.keep_applied
    for digest in node.state.applied_history[-kept:] if kept else ():
        oid = history.snapshot_ref(digest)
        if oid is not None and oid not in oids:
            oids.append(oid)
    for oid in oids:
        try:
            payload, _ = history.blobs(oid)
            snapshot = Snapshot.from_payload(loads_strict(payload))
        except (ReconcilerError, ValueError, KeyError, TypeError):
            continue  # a commit that does not parse offers nothing
        for model in snapshot.models:
            yield from model.files
