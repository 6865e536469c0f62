"""The node's GPUs as facts (docs/contract.md §11): what was discovered, what participation uses.

Where it sits: the runtime edge (``runtime.gpus``) reads NVML and hands back ``GpuFacts``;
``apply.target`` applies the operator's ``vram_mib`` setting (``with_setting``), gives the
figure to ``core.participation`` and takes the fingerprint of the facts and of the CDI specs
(``core.cdi``) into the spec of every runtime with devices (``core.specs``). ``status`` and the
node report show the facts as ``to_json`` writes them.

Pure: no NVML, no file, no clock. Values in, values out.

How several GPUs count: ``vram_mib`` is the memory of the **largest single GPU**, not the sum.
A model's ``min_vram_mib`` says what one copy of it needs in GPU memory; the runtimes this
network ships load a model onto one device unless they shard it, and a node cannot tell from
the snapshot whether they will. Two 12 GiB cards cannot hold a 20 GiB model that must sit on
one, so counting the total would put such a node into subclouds it cannot serve; counting the
largest never overstates what one copy can get.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "GpuDevice",
    "GpuFacts",
    "GpuSource",
    "discovered",
    "gpu_fingerprint",
    "keep_known",
    "no_gpus",
    "with_setting",
]

GpuSource = Literal["nvml", "setting", "none"]


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as NVML names it."""

    index: int
    uuid: str
    name: str
    memory_mib: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_mib": self.memory_mib,
        }


@dataclass(frozen=True)
class GpuFacts:
    """What the node knows of its GPUs, and where ``vram_mib`` came from."""

    source: GpuSource
    devices: tuple[GpuDevice, ...] = ()
    vram_mib: int | None = None  # largest single GPU (module docstring), or the setting
    driver: str | None = None
    note: str | None = None  # why there is nothing from NVML, in one line
    # NVML failed (an error, a timeout) rather than said "no GPU": the caller may keep what
    # it saw last (``keep_known``). Not written out: a kept value says so in its note.
    failed: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "devices": [d.to_json() for d in self.devices],
            "vram_mib": self.vram_mib,
            "driver": self.driver,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GpuFacts:
        """The inverse of ``to_json``; raises ``ValueError`` for anything else."""
        source = obj.get("source")
        if source not in ("nvml", "setting", "none"):
            raise ValueError(f"gpus source {source!r} is not nvml, setting or none")
        try:
            devices = tuple(
                GpuDevice(
                    index=int(d["index"]),
                    uuid=str(d["uuid"]),
                    name=str(d["name"]),
                    memory_mib=int(d["memory_mib"]),
                )
                for d in obj.get("devices") or []
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"gpus device entry is malformed: {exc}") from None
        vram = obj.get("vram_mib")
        driver, note = obj.get("driver"), obj.get("note")
        return cls(
            source=source,
            devices=devices,
            vram_mib=int(vram) if isinstance(vram, int) else None,
            driver=str(driver) if driver is not None else None,
            note=str(note) if note is not None else None,
        )

    def summary(self) -> str:
        """One line for ``status``: source, count, the figure participation uses, driver."""
        if self.source == "none":
            return f"none ({self.note})" if self.note else "none"
        count = f"{len(self.devices)} GPU(s), " if self.devices else ""
        largest = " (largest single GPU)" if self.source == "nvml" and len(self.devices) > 1 else ""
        driver = f", driver {self.driver}" if self.driver else ""
        return f"{self.source}: {count}{self.vram_mib} MiB{largest}{driver}"


def discovered(devices: Iterable[GpuDevice], *, driver: str | None) -> GpuFacts:
    """Facts from NVML; no device at all is ``source: none``, whatever the driver says."""
    found = tuple(sorted(devices, key=lambda d: d.index))
    if not found:
        return GpuFacts(source="none", driver=driver, note="NVML found no GPU")
    return GpuFacts(
        source="nvml", devices=found, vram_mib=max(d.memory_mib for d in found), driver=driver
    )


def no_gpus(note: str) -> GpuFacts:
    return GpuFacts(source="none", note=note)


def keep_known(fresh: GpuFacts, known: GpuFacts | None) -> GpuFacts:
    """What a pass uses when NVML failed: the devices last seen, if any, with a note.

    A driver that hangs or errs once must not make the node leave its subclouds, nor replace
    every container with devices (their fingerprint would change twice: now, and when NVML
    answers again). A library that is missing or a node with no GPU is a fact, not a failure.
    """
    if not fresh.failed or known is None or not known.devices:
        return fresh
    kept = discovered(known.devices, driver=known.driver)
    return replace(kept, note=f"as last seen; now {fresh.note}")


def with_setting(facts: GpuFacts, vram_mib: int | None) -> GpuFacts:
    """The operator's ``vram_mib`` wins over discovery; the devices stay (they are facts)."""
    if vram_mib is None:
        return facts
    return replace(facts, source="setting", vram_mib=vram_mib)


def gpu_fingerprint(facts: GpuFacts, specs: Sequence[tuple[str, str]]) -> str:
    """Lowercase hex SHA-256 of what a runtime with devices depends on besides its definition.

    ``specs`` are the (path, SHA-256 of the bytes) of the CDI spec files that define the
    runtime's devices. The devices (UUID, name, memory) and the driver version are in; the
    ``vram_mib`` setting, the source and the note are not: they change no device a container
    gets, so they must not replace one.
    """
    canonical = {
        "devices": [[d.index, d.uuid, d.name, d.memory_mib] for d in facts.devices],
        "driver": facts.driver,
        "cdi": sorted([path, digest] for path, digest in specs),
    }
    data = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()
