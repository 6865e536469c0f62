"""The container plan: desired ``ContainerSpec`` s + observed containers → ordered ``Action`` s.

Workflow position: the container specs (``core.specs``) and what the Podman edge observes →
**plan_containers** → ``apply.nodeplan`` (part of the node plan) → the Podman edge carries it
out. ``reconcile plan`` prints it, the hooks get it as JSON.

Pure: no I/O, no Podman import, no clock. The Podman edge turns what it sees into
``ObservedContainer`` values; this module only compares.

Rules (docs/contract.md §5):

* a desired container that is missing → ``pull`` its image, then ``create`` it;
* present, managed, same spec label, but not running → ``start`` it (drift repair). A container
  in a state ``start`` cannot leave (paused, dead, removing, unknown) is recreated instead:
  ``pull`` + ``replace`` with stop-first, since it is not serving anyway;
* present, managed, spec label differs → ``pull`` + ``replace`` with the runtime's strategy;
* present, managed, running, same spec, and its runtime is in ``notify_runtimes`` (its
  ``jobs.json`` changed) → ``notify`` by restart or signal. A runtime that is created, replaced
  or started in this pass is not notified: its new process reads the current file anyway;
* managed but not desired (a runtime the snapshot dropped, or a temporary container left by an
  interrupted start-first replace) → ``remove``;
* a managed container named in ``keep`` (the container of a runtime held back because a CDI
  device it asks for is not defined on the node, ``core.cdi``) is left as it is: it is
  neither desired nor removed, since what it runs may still work and the node cannot make a
  new one;
* a container without the managed label is never acted on. If it holds the name a desired
  container needs, the plan records a ``Conflict`` instead of actions for that runtime, and
  ``ContainerPlan.empty`` is false. The apply layer refuses a plan with conflicts before changing
  anything: converging only part of a snapshot would leave a mix no snapshot describes, and
  the foreign container is the node's problem, not the snapshot's (an operator renames or
  removes it; the next pass then goes on).

Order of actions, chosen so that whatever can fail without the snapshot being at fault happens
before anything on the node changes:

1. ``pull`` every image needed (registry trouble stops the pass with nothing touched);
2. ``remove`` undesired containers (frees host ports, GPUs and memory for what comes next);
3. ``replace`` changed containers;
4. ``create`` missing containers;
5. ``start`` stopped containers;
6. ``notify`` runtimes whose jobs changed.

Within a step, actions follow the runtime (or container) name, so equal inputs give equal plans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from reconciler.core.specs import (
    LABEL_CONFIG_DIGEST,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    LABEL_SPEC,
    ContainerSpec,
    UpdateStrategy,
)

__all__ = [
    "STARTABLE_STATES",
    "Action",
    "ActionKind",
    "Conflict",
    "ContainerPlan",
    "ObservedContainer",
    "plan_containers",
]

ActionKind = Literal["pull", "remove", "replace", "create", "start", "notify"]
_ORDER: tuple[ActionKind, ...] = ("pull", "remove", "replace", "create", "start", "notify")

# Podman states from which `podman start` brings a container back as it was.
STARTABLE_STATES = frozenset({"configured", "created", "initialized", "exited", "stopped"})


@dataclass(frozen=True)
class ObservedContainer:
    """A container as the Podman edge saw it. ``labels`` is read-only after construction."""

    id: str
    name: str
    state: str  # Podman's word: running, exited, created, stopped, paused, …
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    image: str = ""  # the reference the container was created from
    image_id: str = ""

    def __post_init__(self) -> None:
        # A frozen dataclass still holds a caller's dict by reference; copy it and seal it.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def managed(self) -> bool:
        return self.labels.get(LABEL_MANAGED) == "true"

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(LABEL_SPEC)

    @property
    def runtime(self) -> str | None:
        return self.labels.get(LABEL_RUNTIME)

    @property
    def config_digest(self) -> str | None:
        return self.labels.get(LABEL_CONFIG_DIGEST)

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class Action:
    """One step of a plan. Fields that do not apply to a kind are None."""

    kind: ActionKind
    runtime: str  # "" for a managed container whose runtime label is missing
    container: str  # the container's (final) name
    reason: str
    container_id: str | None = None  # the existing container acted on (remove/replace/start/notify)
    image: str | None = None  # pull, create, replace
    strategy: UpdateStrategy | None = None  # replace
    notify: str | None = None  # notify: "restart" | "signal:HUP" | …

    def describe(self) -> str:
        """One line for people: what, to which container, and why."""
        who = f"{self.container} (runtime {self.runtime})" if self.runtime else self.container
        if self.kind == "pull":
            return f"pull {self.image} for {who}"
        if self.kind == "replace":
            return f"replace {who} {self.strategy}: {self.reason}"
        if self.kind == "notify":
            return f"notify {who} by {self.notify}: {self.reason}"
        return f"{self.kind} {who}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "runtime": self.runtime,
            "container": self.container,
            "reason": self.reason,
        }
        for key in ("container_id", "image", "strategy", "notify"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class Conflict:
    """A container without the managed label holds the name a desired container needs."""

    runtime: str
    container: str
    container_id: str

    def describe(self) -> str:
        return (
            f"runtime {self.runtime}: container {self.container} ({self.container_id[:12]}) "
            "exists without the managed label; rename or remove it"
        )

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "container": self.container, "id": self.container_id}


@dataclass(frozen=True)
class ContainerPlan:
    actions: tuple[Action, ...] = ()
    conflicts: tuple[Conflict, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the node already matches: nothing to do and nothing in the way."""
        return not self.actions and not self.conflicts

    def describe(self) -> list[str]:
        lines = [a.describe() for a in self.actions]
        lines += [f"conflict: {c.describe()}" for c in self.conflicts]
        return lines

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready object (``json.dumps`` it as is)."""
        return {
            "empty": self.empty,
            "actions": [a.to_json() for a in self.actions],
            "conflicts": [c.to_json() for c in self.conflicts],
        }


def plan_containers(
    desired: Sequence[ContainerSpec],
    observed: Sequence[ObservedContainer],
    *,
    notify_runtimes: frozenset[str] = frozenset(),
    keep: frozenset[str] = frozenset(),
) -> ContainerPlan:
    """What to do so that ``observed`` becomes ``desired`` (module docstring: rules, order)."""
    names = [spec.name for spec in desired]
    if len(set(names)) != len(names):
        raise ValueError("two desired containers share a name")
    by_name = {container.name: container for container in observed}
    actions: list[Action] = []
    conflicts: list[Conflict] = []

    for spec in sorted(desired, key=lambda s: s.name):
        current = by_name.get(spec.name)
        if current is not None and not current.managed:
            conflicts.append(Conflict(spec.runtime, spec.name, current.id))
            continue
        actions.extend(_actions_for(spec, current, notify=spec.runtime in notify_runtimes))

    wanted = set(names)
    for container in sorted(observed, key=lambda c: c.name):
        if container.managed and container.name not in wanted and container.name not in keep:
            actions.append(
                Action(
                    kind="remove",
                    runtime=container.runtime or "",
                    container=container.name,
                    container_id=container.id,
                    reason="not desired",
                )
            )

    # sorted() is stable, so the name order from above survives within each kind.
    ordered = sorted(actions, key=lambda a: _ORDER.index(a.kind))
    return ContainerPlan(actions=tuple(ordered), conflicts=tuple(conflicts))


def _actions_for(
    spec: ContainerSpec, current: ObservedContainer | None, *, notify: bool
) -> list[Action]:
    def act(kind: ActionKind, reason: str, **extra: Any) -> Action:
        return Action(kind=kind, runtime=spec.runtime, container=spec.name, reason=reason, **extra)

    def pull() -> Action:
        return act("pull", "image needed", image=spec.image)

    if current is None:
        return [pull(), act("create", "missing", image=spec.image)]
    if current.spec_hash != spec.spec_hash:
        return [
            pull(),
            act(
                "replace",
                "spec changed",
                container_id=current.id,
                image=spec.image,
                strategy=spec.update,
            ),
        ]
    if current.running:
        if notify:
            return [act("notify", "jobs changed", container_id=current.id, notify=spec.notify)]
        return []
    if current.state in STARTABLE_STATES:
        return [act("start", current.state, container_id=current.id)]
    return [
        pull(),
        act(
            "replace",
            f"{current.state}, cannot be started",
            container_id=current.id,
            image=spec.image,
            strategy="stop-first",
        ),
    ]
