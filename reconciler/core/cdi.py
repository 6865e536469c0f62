"""CDI specs (Container Device Interface) as values, and which runtimes the node can start.

Where it sits: the runtime edge (``runtime.cdi``) reads and parses the spec files in the
``cdi_spec_dirs`` and hands each parsed document to ``parse_spec``; ``apply.target`` calls
``admit_devices`` to learn which runtimes are held back (a device no spec defines) and the
GPU fingerprint of the others (docs/contract.md §11).

Pure: no file is read here, no YAML is parsed here; a document is already a Python value.

Only what a runtime needs from a spec is validated: ``cdiVersion`` (a version string),
``kind`` (``vendor/class``), ``devices`` (a non-empty list, each with a unique ``name`` and a
``containerEdits`` mapping) and the optional spec-wide ``containerEdits``. Edits themselves are
Podman's to apply.

``vendor/class=all`` is **not** implied by the devices of a kind: Podman 4.3 resolves a
fully-qualified name only when a spec defines that device (``nvidia-ctk cdi generate`` writes an
explicit ``all``), and a check that assumed otherwise would pass a runtime that then cannot
start. So ``=all`` must be defined like any other name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.core.documents import RuntimeSpec
from reconciler.core.gpus import GpuFacts, gpu_fingerprint

__all__ = [
    "CdiInventory",
    "CdiSpec",
    "CdiSpecError",
    "DeviceAdmission",
    "HeldRuntime",
    "HostFacts",
    "admit_devices",
    "parse_spec",
]

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_KIND = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_EDIT_LISTS = ("env", "deviceNodes", "mounts", "hooks")


class CdiSpecError(ValueError):
    """A spec file that is not a usable CDI spec; the message is one line without the path."""


@dataclass(frozen=True)
class CdiSpec:
    path: str
    digest: str  # lowercase hex SHA-256 of the file's bytes
    kind: str  # vendor/class
    devices: tuple[str, ...]  # device names, unqualified

    def defines(self, device: str) -> bool:
        kind, sep, name = device.partition("=")
        return bool(sep) and kind == self.kind and name in self.devices


@dataclass(frozen=True)
class CdiInventory:
    """The specs found in the spec folders, and the files that could not be used."""

    dirs: tuple[str, ...] = ()
    specs: tuple[CdiSpec, ...] = ()
    invalid: tuple[tuple[str, str], ...] = ()  # (path, why)

    def defining(self, device: str) -> tuple[CdiSpec, ...]:
        return tuple(s for s in self.specs if s.defines(device))

    def to_json(self) -> dict[str, Any]:
        return {
            "dirs": list(self.dirs),
            "specs": [
                {"path": s.path, "sha256": s.digest, "kind": s.kind, "devices": list(s.devices)}
                for s in self.specs
            ],
            "invalid": [{"path": p, "why": w} for p, w in self.invalid],
        }


def _edits(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise CdiSpecError(f"{where} is not a mapping")
    for key in _EDIT_LISTS:
        if key in value and value[key] is not None and not isinstance(value[key], list):
            raise CdiSpecError(f"{where}.{key} is not a list")
    for node in value.get("deviceNodes") or []:
        if not isinstance(node, Mapping) or not isinstance(node.get("path"), str):
            raise CdiSpecError(f"{where}.deviceNodes has an entry without a path")
    for entry in value.get("env") or []:
        if not isinstance(entry, str):
            raise CdiSpecError(f"{where}.env has an entry that is not a string")


def parse_spec(doc: Any, *, path: str, digest: str) -> CdiSpec:
    """The spec ``doc`` (a parsed YAML or JSON document) describes; ``CdiSpecError`` if none."""
    if not isinstance(doc, Mapping):
        raise CdiSpecError("not a mapping")
    version = doc.get("cdiVersion")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise CdiSpecError(f"cdiVersion {version!r} is not a version like 0.5.0")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise CdiSpecError(f"kind {kind!r} is not vendor/class")
    if "containerEdits" in doc:
        _edits(doc["containerEdits"], "containerEdits")
    devices = doc.get("devices")
    if not isinstance(devices, list) or not devices:
        raise CdiSpecError("devices is not a non-empty list")
    names: list[str] = []
    for number, device in enumerate(devices):
        if not isinstance(device, Mapping):
            raise CdiSpecError(f"devices[{number}] is not a mapping")
        name = device.get("name")
        if not isinstance(name, str) or not _DEVICE.match(name):
            raise CdiSpecError(f"devices[{number}].name {name!r} is not a CDI device name")
        if name in names:
            raise CdiSpecError(f"device {name!r} is defined twice")
        if "containerEdits" not in device:
            raise CdiSpecError(f"device {name!r} has no containerEdits")
        _edits(device["containerEdits"], f"device {name!r} containerEdits")
        names.append(name)
    return CdiSpec(path=path, digest=digest, kind=kind, devices=tuple(names))


@dataclass(frozen=True)
class HostFacts:
    """What one pass read of the node's devices: its GPUs and its CDI specs."""

    gpus: GpuFacts
    cdi: CdiInventory


@dataclass(frozen=True)
class HeldRuntime:
    """A runtime the node does not create: it asks for a device no CDI spec defines."""

    runtime: str
    device: str

    @property
    def why(self) -> str:
        return f"device {self.device} is not defined by any CDI spec on this node"

    def describe(self) -> str:
        return f"hold runtime {self.runtime}: {self.why}"

    def to_json(self) -> dict[str, str]:
        return {"runtime": self.runtime, "device": self.device, "why": self.why}


@dataclass(frozen=True)
class DeviceAdmission:
    fingerprints: Mapping[str, str]  # runtime → GPU fingerprint, for runtimes with devices
    held: tuple[HeldRuntime, ...]

    @property
    def held_runtimes(self) -> frozenset[str]:
        return frozenset(h.runtime for h in self.held)


def admit_devices(
    runtimes: Sequence[RuntimeSpec], *, gpus: GpuFacts, cdi: CdiInventory
) -> DeviceAdmission:
    """Which runtimes with devices can be created, and the fingerprint of each that can."""
    fingerprints: dict[str, str] = {}
    held: list[HeldRuntime] = []
    for runtime in sorted(runtimes, key=lambda r: r.name):
        if not runtime.devices:
            continue
        used: dict[str, str] = {}
        missing = None
        for device in runtime.devices:
            defining = cdi.defining(device)
            if not defining:
                missing = device
                break
            used.update((s.path, s.digest) for s in defining)
        if missing is not None:
            held.append(HeldRuntime(runtime=runtime.name, device=missing))
            continue
        fingerprints[runtime.name] = gpu_fingerprint(gpus, sorted(used.items()))
    return DeviceAdmission(fingerprints=fingerprints, held=tuple(held))
