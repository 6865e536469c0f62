"""Step 1 of the apply: HEAD's commit, re-verified, turned into what the node must look like.

Where it sits: after crash recovery (``apply.recovery``), before the node plan
(``apply.nodeplan``). It reads the commit and the root that accepted it from the node's own
history and computes the ``ApplyTarget`` with the pure core (``trust``, ``specs``,
``participation``). It changes nothing: an unverifiable commit raises ``RejectedError``, an
unsafe container definition ``SnapshotFaultError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.documents import Snapshot
from reconciler.core.participation import ParticipationView, participation, runtime_files
from reconciler.core.specs import ContainerSpec, container_specs
from reconciler.history.node import Node

__all__ = ["ApplyTarget", "load_target"]


@dataclass(frozen=True, kw_only=True)
class ApplyTarget:
    """The snapshot an apply converges to, and everything derived from it."""

    commit: str
    digest: str
    serial: int
    reason: str  # the commit's Reason trailer
    snapshot: Snapshot
    containers: tuple[ContainerSpec, ...]
    view: ParticipationView
    files: dict[str, bytes]  # runtime/<name> → its bytes


def load_target(node: Node, oid: str) -> ApplyTarget:
    """Re-verify a commit against the root that accepted it and compute the node's target."""
    info, verified = node.reverify(oid)
    snapshot = verified.snapshot
    view = participation(
        snapshot, vram_mib=node.settings.vram_mib, opt_out=node.settings.opt_out_subclouds
    )
    return ApplyTarget(
        commit=oid,
        digest=info.digest,
        serial=info.serial,
        reason=info.reason,
        snapshot=snapshot,
        containers=tuple(container_specs(snapshot, config_digest=info.digest, paths=node.paths)),
        view=view,
        files=runtime_files(snapshot, config_digest=info.digest, view=view),
    )
