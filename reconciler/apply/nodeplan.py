"""Step 2 of the apply: what converging the node to its target would do.

Where it sits: after ``apply.target``, before the attempt (``apply.steps``); ``reconcile plan``
prints it and ``pre-apply`` gets it as ``work/plan.json``. It compares the target with what
the runtime edge observes, what the model store holds and the files in ``runtime/``; it
changes nothing. The container part is the pure ``core.containerplan``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.apply.edges import ModelsEdge, RuntimeEdge
from reconciler.apply.target import ApplyTarget
from reconciler.core.containerplan import ContainerPlan, plan_containers
from reconciler.core.documents import ModelSpec
from reconciler.core.specs import container_name

__all__ = ["NOTIFYING_FILES", "NodePlan", "plan_node"]

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
