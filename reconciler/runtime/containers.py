"""Container operations: create, start, restart, signal, stop and remove, rename; networks.

Workflow position: the executor (``reconciler.runtime.executor``) composes these into the
plan's actions; each is one Podman API call or a short, fixed sequence of them.

What it may not do: decide what to change (the plan did, and only managed containers are in
it: ids come from the plan or from ``create``), touch a container or network without the
managed label (``clear_temporary`` and the network check refuse one with ``ContainerError``),
or let a podman-py exception out. A container that Podman will not start is the snapshot's
fault (``SnapshotFaultError``) and is removed; any other refusal is a ``ContainerError``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from reconciler.core.errors import ContainerError, ReconcilerError, SnapshotFaultError
from reconciler.core.specs import LABEL_MANAGED, LOOPBACK, ContainerSpec
from reconciler.runtime.client import PodmanConnection, body_reason, http_status
from reconciler.runtime.observe import observe

__all__ = [
    "clear_temporary",
    "create",
    "discard",
    "kill",
    "remove",
    "rename",
    "restart",
    "start",
]


def create(connection: PodmanConnection, spec: ContainerSpec, *, name: str, where: str) -> str:
    """Create (not start) the container ``spec`` defines, called ``name``; its id."""
    if spec.network is not None:
        _ensure_network(connection, spec.network, where=where)
    command = list(spec.command) if spec.command is not None else None
    with connection.guard(f"{where}: creating {name}"):
        container = connection.client.containers.create(
            spec.image, command, **_create_options(spec, name=name)
        )
    return str(container.id)


def _create_options(spec: ContainerSpec, *, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "labels": spec.labels,
        "environment": dict(spec.env),
        "mounts": [
            {"type": "bind", "source": m.source, "target": m.target, "read_only": True}
            for m in spec.mounts
        ],
        "restart_policy": {
            "Name": spec.restart_policy,
            "MaximumRetryCount": spec.restart_retries,
        },
    }
    if spec.devices:
        options["devices"] = list(spec.devices)
    if spec.network is None:
        options["network_mode"] = "none"
        return options
    options["networks"] = {spec.network: {}}
    published: dict[str, list[tuple[str, int]]] = {}
    for port in spec.ports:
        key = f"{port.container}/{port.protocol}"
        published.setdefault(key, []).append((LOOPBACK, port.host))
    options["ports"] = published
    return options


def _ensure_network(connection: PodmanConnection, network: str, *, where: str) -> None:
    try:
        with connection.guard(f"{where}: looking up network {network}"):
            attrs = connection.client.networks.get(network).attrs
    except ContainerError as exc:
        if http_status(exc.__cause__) != 404:
            raise
        with connection.guard(f"{where}: creating network {network}"):
            connection.client.networks.create(
                network,
                driver="bridge",
                # Containers on it cannot reach containers on Podman's other networks.
                options={"isolate": "true"},
                labels={LABEL_MANAGED: "true"},
            )
        return
    if (attrs.get("labels") or {}).get(LABEL_MANAGED) != "true":
        raise ContainerError(
            f"{where}: network {network} exists without the managed label; rename or remove it"
        )


def clear_temporary(connection: PodmanConnection, name: str, *, where: str) -> None:
    """Remove a managed leftover called ``name``; refuse if an unmanaged one has it."""
    for observed in observe(connection):
        if observed.name != name:
            continue
        if not observed.managed:
            raise ContainerError(
                f"{where}: container {name} exists without the managed label; rename or remove it"
            )
        remove(connection, observed.id, where=where)


def start(connection: PodmanConnection, container_id: str, *, where: str) -> None:
    """Start a created or stopped container (one already running is fine)."""
    with connection.guard(f"{where}: starting"):
        response = connection.client.api.post(f"/containers/{container_id}/start")
    _check_started(connection, response, container_id, where=where, doing="start")


def restart(connection: PodmanConnection, container_id: str, *, where: str) -> None:
    """Stop (with the stop timeout) and start again."""
    with connection.guard(f"{where}: restarting"):
        response = connection.client.api.post(
            f"/containers/{container_id}/restart",
            params=connection.stop_params(),
            timeout=connection.stop_call_timeout_s,
        )
    _check_started(connection, response, container_id, where=where, doing="restart")


def kill(connection: PodmanConnection, container_id: str, *, signal: str, where: str) -> None:
    """Send ``SIG<signal>`` to the container's main process."""
    with connection.guard(f"{where}: sending SIG{signal}"):
        response = connection.client.api.post(
            f"/containers/{container_id}/kill", params={"signal": signal}
        )
        response.raise_for_status()


def _check_started(
    connection: PodmanConnection, response: Any, container_id: str, *, where: str, doing: str
) -> None:
    code = int(response.status_code)
    if code < 400 or code == 304:
        return
    if code == 404:
        raise ContainerError(f"{where}: container {container_id[:12]} is gone")
    # Podman could not start what the snapshot defined (no such executable, a port in
    # use, a device that will not attach): the snapshot's fault by docs/contract.md §5.
    reason = body_reason(str(response.text))
    discard(connection, container_id)
    raise SnapshotFaultError(f"{where}: container would not {doing}: {reason}")


def remove(connection: PodmanConnection, container_id: str, *, where: str) -> None:
    """Stop (with the stop timeout) and delete; a container already gone is fine."""
    short = container_id[:12]
    with connection.guard(f"{where}: stopping {short}"):
        response = connection.client.api.post(
            f"/containers/{container_id}/stop",
            params=connection.stop_params(),
            timeout=connection.stop_call_timeout_s,
        )
    if int(response.status_code) not in (204, 304, 404):
        raise ContainerError(
            f"{where}: Podman would not stop {short}: {body_reason(str(response.text))}"
        )
    with connection.guard(f"{where}: removing {short}"):
        response = connection.client.api.delete(
            f"/containers/{container_id}",
            params={"force": True},
            timeout=connection.stop_call_timeout_s,
        )
    if int(response.status_code) >= 400 and int(response.status_code) != 404:
        raise ContainerError(
            f"{where}: Podman would not remove {short}: {body_reason(str(response.text))}"
        )


def discard(connection: PodmanConnection, container_id: str) -> None:
    """Best-effort removal of a container that failed its gate (the error is the news)."""
    with contextlib.suppress(ReconcilerError):
        remove(connection, container_id, where="discarding a failed container")


def rename(connection: PodmanConnection, container_id: str, *, name: str, where: str) -> None:
    with connection.guard(f"{where}: renaming {container_id[:12]} to {name}"):
        response = connection.client.api.post(
            f"/containers/{container_id}/rename", params={"name": name}
        )
        response.raise_for_status()
