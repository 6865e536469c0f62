"""Step 1 of the apply: HEAD's commit, re-verified, turned into what the node must look like.

Where it sits: after crash recovery (``apply.recovery``), before the node plan
(``apply.nodeplan``). It reads the commit and the root that accepted it from the node's own
history and computes the ``ApplyTarget`` with the pure core (``trust``, ``specs``,
``participation``, ``cdi``) and the node's devices as the host edge read them (GPUs, CDI
specs). It changes nothing: an unverifiable commit raises ``RejectedError``, an unsafe
container definition ``SnapshotFaultError``. A runtime asking for a CDI device the node does
not define is not an error: it is held back (``held``), and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.apply.edges import NodeHost
from reconciler.core.cdi import CdiInventory, HeldRuntime, HostFacts, admit_devices
from reconciler.core.documents import Snapshot
from reconciler.core.gpus import GpuFacts, no_gpus, with_setting
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
    containers: tuple[ContainerSpec, ...]  # without the held runtimes
    view: ParticipationView
    files: dict[str, bytes]  # runtime/<name> → its bytes
    gpus: GpuFacts = field(default_factory=lambda: no_gpus("not read"))  # vram_mib setting applied
    cdi: CdiInventory = field(default_factory=CdiInventory)
    held: tuple[HeldRuntime, ...] = ()  # runtimes not created: a device no CDI spec defines

    def facts_json(self) -> dict[str, object]:
        """``<state>/gpus.json``: what ``status``, the metrics and the node report show."""
        return {
            "config_digest": self.digest,
            "gpus": self.gpus.to_json(),
            "cdi": self.cdi.to_json(),
            "held": [h.to_json() for h in self.held],
        }


def load_target(node: Node, oid: str, *, host: HostFacts | None = None) -> ApplyTarget:
    """Re-verify a commit against the root that accepted it and compute the node's target;
    ``host`` is the node's devices as read this pass (read now when not given)."""
    info, verified = node.reverify(oid)
    snapshot = verified.snapshot
    host = host if host is not None else NodeHost().read(node.settings)
    gpus = with_setting(host.gpus, node.settings.vram_mib)
    view = participation(snapshot, vram_mib=gpus.vram_mib, opt_out=node.settings.opt_out_subclouds)
    admission = admit_devices(snapshot.runtimes, gpus=host.gpus, cdi=host.cdi)
    specs = container_specs(
        snapshot, config_digest=info.digest, paths=node.paths, fingerprints=admission.fingerprints
    )
    held = admission.held_runtimes
    return ApplyTarget(
        commit=oid,
        digest=info.digest,
        serial=info.serial,
        reason=info.reason,
        snapshot=snapshot,
        containers=tuple(s for s in specs if s.runtime not in held),
        view=view,
        files=runtime_files(snapshot, config_digest=info.digest, view=view, gpus=gpus),
        gpus=gpus,
        cdi=host.cdi,
        held=admission.held,
    )
