"""Step 2 of the apply: what converging the node to its target would do.

Where it sits: after ``apply.target``, before the attempt (``apply.steps``); ``reconcile plan``
prints it and ``pre-apply`` gets it as ``work/plan.json``. It compares the target with what
the runtime edge observes, what the model store holds and the files in ``runtime/``; it
changes nothing. The container part is the pure ``core.containerplan``. ``plan_agent`` adds
what the converged pass would then do about the agent (``selfupdate.plan``), for ``plan``
only: the transaction does not need it to decide whether to apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.apply.edges import ModelsEdge, RuntimeEdge
from reconciler.apply.target import ApplyTarget
from reconciler.core.containerplan import ContainerPlan, plan_containers
from reconciler.core.documents import ModelSpec
from reconciler.core.specs import container_name
from reconciler.history.node import Node
from reconciler.selfupdate.plan import AgentPlan, HookState, read_agent_plan

__all__ = ["NOTIFYING_FILES", "NodePlan", "plan_agent", "plan_node"]

# Files under runtime/ whose change the runtime is told about (docs/contract.md §2: notify).
NOTIFYING_FILES = ("jobs.json", "participation.json")


@dataclass(frozen=True, kw_only=True)
class NodePlan:
    """Everything converging to ``target`` would do; ``empty`` means converged."""

    target: ApplyTarget
    containers: ContainerPlan
    models_to_install: tuple[ModelSpec, ...]
    download_bytes: int
    trees_to_remove: tuple[str, ...]
    files_changed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """Held runtimes do not count: no pass can create them until the node's CDI specs
        change, and then the plan has a ``create`` for them."""
        return (
            self.containers.empty
            and not self.models_to_install
            and not self.trees_to_remove
            and not self.files_changed
        )

    @property
    def image_pulls(self) -> ContainerPlan:
        """The pulls, with the conflicts: refused before anything running is touched."""
        pulls = tuple(a for a in self.containers.actions if a.kind == "pull")
        return replace(self.containers, actions=pulls)

    @property
    def container_changes(self) -> ContainerPlan:
        """Every action but the pulls, in the plan's order."""
        changes = tuple(a for a in self.containers.actions if a.kind != "pull")
        return replace(self.containers, actions=changes)

    def describe(self) -> list[str]:
        lines = [f"install model {m.id}" for m in self.models_to_install]
        if self.download_bytes:
            lines.append(f"download {self.download_bytes} bytes of model files")
        lines += [f"write runtime/{name}" for name in self.files_changed]
        lines += self.containers.describe()
        lines += [held.describe() for held in self.target.held]
        lines += [f"remove model {model_id}" for model_id in self.trees_to_remove]
        return lines

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {
            "config_digest": t.digest,
            "serial": t.serial,
            "commit": t.commit,
            "empty": self.empty,
            "containers": self.containers.to_json(),
            "models": {
                "install": [m.id for m in self.models_to_install],
                "download_bytes": self.download_bytes,
                "remove": list(self.trees_to_remove),
            },
            "runtime_files": list(self.files_changed),
            "participation": {"subclouds": list(t.view.subclouds), "modes": list(t.view.modes)},
            "held": [h.to_json() for h in t.held],
        }


def _changed_files(runtime_dir: Path, files: dict[str, bytes]) -> tuple[str, ...]:
    changed = []
    for name, data in sorted(files.items()):
        try:
            if (runtime_dir / name).read_bytes() == data:
                continue
        except OSError:
            pass
        changed.append(name)
    return tuple(changed)


def plan_node(
    target: ApplyTarget, *, runtime_dir: Path, runtime: RuntimeEdge, models: ModelsEdge
) -> NodePlan:
    """Observe the runtime and the model store and compare them with ``target``."""
    files_changed = _changed_files(runtime_dir, target.files)
    # A runtime is notified only of a change to a file it already read: on the first apply
    # there is no jobs.json yet, and every container starts with the new files anyway.
    existed = (runtime_dir / "jobs.json").exists()
    notify = (
        frozenset(spec.runtime for spec in target.containers)
        if existed and any(n in files_changed for n in NOTIFYING_FILES)
        else frozenset()
    )
    keep = frozenset(container_name(h.runtime) for h in target.held)
    containers = plan_containers(
        target.containers, runtime.observe(), notify_runtimes=notify, keep=keep
    )
    wanted = target.snapshot.models
    to_install = models.not_installed(wanted)
    wanted_ids = {m.id for m in wanted}
    to_remove = tuple(sorted(i for i in models.installed_ids() if i not in wanted_ids))
    return NodePlan(
        target=target,
        containers=containers,
        models_to_install=to_install,
        download_bytes=models.bytes_needed(to_install) if to_install else 0,
        trees_to_remove=to_remove,
        files_changed=files_changed,
    )


def _hook_state(node: Node, target: ApplyTarget) -> HookState:
    """The ``agent-update`` hook as ``apply.steps.run_agent_update`` will find it: run once
    per approved (version, digest), remembered in the node record whatever its exit."""
    hook = Path(node.settings.hooks_dir) / "agent-update"
    if not (hook.is_file() and os.access(hook, os.X_OK)):
        return "absent"
    agent = target.snapshot.updates.get("agent") or {}
    done = node.state.agent_update or {}
    ran = (done.get("version"), done.get("digest")) == (agent.get("version"), agent.get("digest"))
    return "ran" if ran else "due"


def plan_agent(node: Node, target: ApplyTarget) -> AgentPlan:
    """What the next converged pass does about the agent: from HEAD, the settings and
    ``<state>/agent/`` only (no origin, mirror or registry)."""
    snapshot = target.snapshot
    return read_agent_plan(
        node.paths.state_dir,
        updates=snapshot.updates,
        images={r.name: r.image for r in snapshot.runtimes},
        self_update=node.settings.self_update,
        min_version=node.settings.agent_min_version,
        hook=_hook_state(node, target),
    )
