"""Observe: the containers Podman runs, as the container plan sees them.

Workflow position: the first step of a pass over the runtime. ``PodmanEdge.observe()``
hands what it lists here to ``reconciler.core.containerplan.plan_containers()``; the executor
observes again before a replacement to find a temporary container a crash left behind.

What it may not do: change anything (it only lists and inspects), or let a podman-py
exception out (every call runs under ``PodmanConnection.guard``).
"""

from __future__ import annotations

from typing import Any

from reconciler.core.containerplan import ObservedContainer
from reconciler.core.specs import LABEL_MANAGED, NETWORK_NAME
from reconciler.runtime.client import PodmanConnection

__all__ = ["container_ip", "observe"]

# Only containers named so can hold a desired container's name.
_CONTAINER_PREFIX = "reconciler-"


def observe(connection: PodmanConnection) -> list[ObservedContainer]:
    """Managed containers, plus unmanaged ones whose name could collide. Sorted by name.

    Managed containers are found by label; unmanaged ones are listed only if their name
    starts with ``reconciler-``, as only those can hold a desired container's name. Two
    list calls and no inspection: libpod's list entries carry the id, name, state,
    labels, image and image id exactly as an inspect does, in every state (compared on
    Podman 4.3: created, running, paused, exited, stopped), and inspecting each container
    cost one round trip apiece, a tenth of a converged ``once`` (bench/noop.py).
    """
    containers = connection.client.containers
    with connection.guard("listing containers"):
        managed = containers.list(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
        named = containers.list(all=True, filters={"name": "^" + _CONTAINER_PREFIX})
    seen: dict[str, ObservedContainer] = {}
    for container in managed:
        seen[container.id] = _listed(container.id, container.attrs)
    for container in named:
        observed = _listed(container.id, container.attrs)
        if container.id in seen or not observed.name.startswith(_CONTAINER_PREFIX):
            continue
        seen[container.id] = observed
    return sorted(seen.values(), key=lambda c: c.name)


def container_ip(
    connection: PodmanConnection, container: str, *, network: str = NETWORK_NAME
) -> str | None:
    """The container's address on ``network`` (tests probe runtimes through it)."""
    with connection.guard(f"inspecting container {container}"):
        attrs = connection.client.containers.get(container).attrs
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    address = (networks.get(network) or {}).get("IPAddress")
    return str(address) if address else None


def _listed(container_id: str, attrs: dict[str, Any]) -> ObservedContainer:
    """An entry of libpod's container list as the plan sees it."""
    names = attrs.get("Names") or [container_id]
    return ObservedContainer(
        id=container_id,
        name=str(names[0]),
        state=str(attrs.get("State", "")),
        labels=attrs.get("Labels") or {},
        image=str(attrs.get("Image", "")),
        image_id=str(attrs.get("ImageID", "")),
    )
