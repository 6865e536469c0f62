"""What the runtime containers should look like: a snapshot's runtimes → ``ContainerSpec`` s.

Workflow position: history gives the snapshot to converge to → **desired** → plan → containers.
The result is compared with what Podman reports (``reconciler.plan``) and then handed to the
Podman edge (``reconciler.containers``) to create containers from.

Pure: no I/O, no clock, no Podman import. Host paths are computed from ``NodePaths`` as strings;
nothing here checks that they exist (the apply layer makes sure ``runtime/`` and each model tree
are on disk before a container is created).

Defence in depth (docs/contract.md §2 "never privileged, never host namespaces, never a host
path outside the node's model and runtime folders"): the schema already forbids all of that, and
this module checks it again because a container definition is the one place where a mistake
gives a snapshot power over the host. ``ContainerSpec`` has no field that could express
privileged mode, a host namespace, a writable bind mount or a host device path, so the Podman
edge cannot be asked for them. Anything that would slip past the schema raises
``UnsafeSpecError`` (a ``SnapshotFaultError``: the snapshot is to blame, so it is quarantined,
never retried).

The spec hash covers every field of the normalised definition (image, command, env, mounts,
devices, ports, network, restart policy, health, update, notify) plus a format version, and
nothing else: job parameters and the config digest are deliberately left out, so a snapshot that
only changes ``jobs`` (or nothing a container sees) never replaces a container. A runtime with
devices also has its GPU fingerprint in it (``core.gpus``: the node's GPU facts and the CDI
specs defining its devices), so a driver update or a regenerated spec replaces its container.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from reconciler.core.documents import HealthCheck, PortMapping, RuntimeSpec, Snapshot
from reconciler.core.errors import SettingsError, SnapshotFaultError
from reconciler.core.paths import NodePaths

__all__ = [
    "CONTAINER_PREFIX",
    "LABEL_CONFIG_DIGEST",
    "LABEL_MANAGED",
    "LABEL_RUNTIME",
    "LABEL_SPEC",
    "LOOPBACK",
    "NETWORK_NAME",
    "RESTART_POLICY",
    "RESTART_RETRIES",
    "RUNTIME_MOUNT",
    "BindMount",
    "ContainerSpec",
    "UnsafeSpecError",
    "UpdateStrategy",
    "container_name",
    "container_specs",
]

LABEL_MANAGED = "io.resultity.reconciler.managed"
LABEL_SPEC = "io.resultity.reconciler.spec"
LABEL_CONFIG_DIGEST = "io.resultity.reconciler.config-digest"
LABEL_RUNTIME = "io.resultity.reconciler.runtime"

CONTAINER_PREFIX = "reconciler-"
# The one bridge network that runtimes with ports join; created by the Podman edge on demand.
NETWORK_NAME = "reconciler"
LOOPBACK = "127.0.0.1"
# Podman restarts a crashed runtime by itself between passes, a few times: with "always" a
# runtime that dies at once would be restarted in a tight loop (Podman has no back-off); after
# the last retry it stays exited and the agent's next pass starts it again behind the gate.
RESTART_POLICY = "on-failure"
RESTART_RETRIES = 3
# The node's runtime/ folder is mounted as a directory, not jobs.json alone: a bind-mounted
# file pins the inode it had at start, so a process told by signal to re-read jobs.json would
# keep seeing the old bytes after the agent replaced the file atomically. Mounting the folder
# keeps `/run/reconciler/jobs.json` (docs/contract.md §2) current and also exposes the other
# files the contract passes through runtime/ (participation.json, …).
RUNTIME_MOUNT = "/run/reconciler"

# Bumped whenever the way a runtime becomes a container changes, so that every container made
# the old way is replaced once.
_SPEC_FORMAT = 1

UpdateStrategy = Literal["stop-first", "start-first"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_PINNED_IMAGE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
_CONFIG_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CDI_DEVICE = re.compile(
    r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+/[a-z0-9][a-z0-9._-]*"
    r"=[A-Za-z0-9][A-Za-z0-9._:-]*$"
)
_NOTIFY = re.compile(r"^(restart|signal:(HUP|USR1|USR2))$")


class UnsafeSpecError(SnapshotFaultError):
    """A runtime definition asks for something a node never grants (host path, device path…)."""

    def __init__(self, runtime: str, reason: str) -> None:
        self.runtime = runtime
        self.reason = reason
        super().__init__(f"runtime {runtime}: refused: {reason}")


@dataclass(frozen=True)
class BindMount:
    """A host folder or file shown inside the container. Always read-only: there is no flag."""

    source: str  # absolute host path, inside the node's models/ or runtime/ folder
    target: str  # absolute path inside the container


@dataclass(frozen=True)
class ContainerSpec:
    """One runtime container as the node should run it."""

    name: str  # container name: CONTAINER_PREFIX + runtime
    runtime: str
    image: str  # pinned: repo[:tag]@sha256:<hex>
    command: tuple[str, ...] | None  # None: the image's own command
    env: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    mounts: tuple[BindMount, ...]
    devices: tuple[str, ...]  # CDI names only
    ports: tuple[PortMapping, ...]  # published on LOOPBACK only
    network: str | None  # None: network mode "none"
    restart_policy: str
    restart_retries: int
    health: HealthCheck | None
    update: UpdateStrategy
    notify: str  # "restart" | "signal:HUP" | "signal:USR1" | "signal:USR2"
    config_digest: str  # recorded in a label only; not part of the spec hash
    # core.gpus.gpu_fingerprint of the node's GPU facts and the CDI specs defining ``devices``
    # (runtimes with devices only): a new driver or a regenerated spec replaces the container.
    gpu_fingerprint: str | None = None

    def definition(self) -> dict[str, Any]:
        """The normalised definition the spec hash is taken of (JSON-ready, key order free)."""
        health = self.health
        out: dict[str, Any] = {
            "format": _SPEC_FORMAT,
            "name": self.name,
            "runtime": self.runtime,
            "image": self.image,
            "command": list(self.command) if self.command is not None else None,
            "env": [[key, value] for key, value in self.env],
            "mounts": [{"source": m.source, "target": m.target, "ro": True} for m in self.mounts],
            "devices": list(self.devices),
            "ports": [
                {"host_ip": LOOPBACK, "host": p.host, "container": p.container, "proto": p.protocol}
                for p in self.ports
            ],
            "network": self.network,
            "restart_policy": self.restart_policy,
            "restart_retries": self.restart_retries,
            "health": None
            if health is None
            else {
                "command": list(health.command),
                "interval_s": health.interval_s,
                "timeout_s": health.timeout_s,
                "retries": health.retries,
                "start_period_s": health.start_period_s,
            },
            "update": self.update,
            "notify": self.notify,
        }
        # Only present when set, so that runtimes without devices keep the hash they had.
        if self.gpu_fingerprint is not None:
            out["gpu"] = self.gpu_fingerprint
        return out

    @property
    def spec_hash(self) -> str:
        """Lowercase hex SHA-256 of the canonical JSON of ``definition()``."""
        canonical = json.dumps(
            self.definition(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_SPEC: self.spec_hash,
            LABEL_CONFIG_DIGEST: self.config_digest,
            LABEL_RUNTIME: self.runtime,
        }


def container_name(runtime: str) -> str:
    return CONTAINER_PREFIX + runtime


def container_specs(
    snapshot: Snapshot,
    *,
    config_digest: str,
    paths: NodePaths,
    fingerprints: Mapping[str, str] | None = None,
) -> list[ContainerSpec]:
    """The containers ``snapshot`` asks for, sorted by runtime name.

    ``fingerprints`` (runtime → GPU fingerprint, ``core.cdi.admit_devices``) go into the spec
    of the runtimes with devices that they name.

    Raises ``UnsafeSpecError`` for a runtime that would reach outside the node's model and
    runtime folders or otherwise past what a runtime may have, ``SettingsError`` if the state
    folder is not an absolute path (bind mounts need one) and ``ValueError`` for a malformed
    ``config_digest``.
    """
    if not _CONFIG_DIGEST.match(config_digest):
        raise ValueError(f"config digest {config_digest!r} is not sha256:<64 lowercase hex>")
    state_dir = str(paths.state_dir)
    if not posixpath.isabs(state_dir):
        raise SettingsError(f"state_dir must be an absolute path, not {state_dir!r}")
    roots = (_normal(str(paths.models)), _normal(str(paths.runtime)))
    prints = fingerprints or {}
    specs = [
        _spec(runtime, config_digest=config_digest, paths=paths, roots=roots)
        for runtime in snapshot.runtimes
    ]
    specs = [replace(s, gpu_fingerprint=prints.get(s.runtime)) if s.devices else s for s in specs]
    return sorted(specs, key=lambda s: s.runtime)


def _spec(
    runtime: RuntimeSpec, *, config_digest: str, paths: NodePaths, roots: tuple[str, str]
) -> ContainerSpec:
    name = runtime.name

    def refuse(reason: str) -> UnsafeSpecError:
        return UnsafeSpecError(name, reason)

    if not _NAME.match(name):
        raise refuse(f"name {name!r} is not a valid runtime name")
    if not _PINNED_IMAGE.match(runtime.image):
        raise refuse(f"image {runtime.image!r} is not pinned by sha256 digest")
    if not _NOTIFY.match(runtime.notify):
        raise refuse(f"notify {runtime.notify!r} is not restart or signal:HUP|USR1|USR2")
    if runtime.update not in ("stop-first", "start-first"):
        raise refuse(f"update {runtime.update!r} is not stop-first or start-first")
    if runtime.update == "start-first" and runtime.ports:
        raise refuse("start-first cannot be used with ports: two containers cannot hold a port")
    for device in runtime.devices:
        # Podman would take a host path such as /dev/sda here just as well: only CDI names pass.
        if not _CDI_DEVICE.match(device):
            raise refuse(f"device {device!r} is not a CDI device name")
    for port in runtime.ports:
        if not (1 <= port.host <= 65535 and 1 <= port.container <= 65535):
            raise refuse(f"port {port.host}:{port.container} is out of range")
        if port.protocol not in ("tcp", "udp"):
            raise refuse(f"port protocol {port.protocol!r} is not tcp or udp")

    mounts = [*_model_mounts(runtime, paths=paths, refuse=refuse)]
    mounts.append(BindMount(source=_normal(str(paths.runtime)), target=RUNTIME_MOUNT))
    targets = [m.target for m in mounts]
    if len(set(targets)) != len(targets):
        raise refuse("two mounts share a target path")
    for mount in mounts:
        if not any(_inside(mount.source, root) for root in roots):
            raise refuse(f"mount source {mount.source} is outside the node's models and runtime")
        if mount.target != RUNTIME_MOUNT and _inside(mount.target, RUNTIME_MOUNT):
            raise refuse(f"mount target {mount.target} is inside {RUNTIME_MOUNT}")

    return ContainerSpec(
        name=container_name(name),
        runtime=name,
        image=runtime.image,
        command=runtime.command,
        env=tuple(sorted(runtime.env)),
        mounts=tuple(mounts),
        devices=tuple(runtime.devices),
        ports=tuple(runtime.ports),
        network=NETWORK_NAME if runtime.ports else None,
        restart_policy=RESTART_POLICY,
        restart_retries=RESTART_RETRIES,
        health=runtime.health,
        update=runtime.update,
        notify=runtime.notify,
        config_digest=config_digest,
    )


def _model_mounts(
    runtime: RuntimeSpec, *, paths: NodePaths, refuse: Callable[[str], UnsafeSpecError]
) -> list[BindMount]:
    mount_root = runtime.model_mount
    if not posixpath.isabs(mount_root) or _normal(mount_root) != mount_root or mount_root == "/":
        raise refuse(f"model_mount {mount_root!r} is not a normalised absolute path")
    mounts = []
    for model_id in runtime.models:
        model, sep, version = model_id.partition(":")
        if not sep or not _NAME.match(model) or not _NAME.match(version):
            raise refuse(f"model id {model_id!r} is not name:version")
        # The name regex starts with a letter or digit and has no "/", so each part is one
        # plain path component ("." and ".." cannot pass); _inside() below checks again anyway.
        source = _normal(posixpath.join(str(paths.models), model, version))
        target = _normal(posixpath.join(mount_root, model, version))
        mounts.append(BindMount(source=source, target=target))
    return mounts


def _normal(path: str) -> str:
    return posixpath.normpath(path)


def _inside(path: str, root: str) -> bool:
    """Whether normalised ``path`` is ``root`` or below it (lexically: nothing is resolved)."""
    path, root = _normal(path), _normal(root)
    return path == root or path.startswith(root.rstrip("/") + "/")
