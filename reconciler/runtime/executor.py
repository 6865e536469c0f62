"""The executor: carry out a container plan's actions in order, one executor per action kind.

Workflow position: desired → plan → **execute**. ``PodmanEdge.apply()`` hands it the plan of
``reconciler.core.containerplan.plan_containers()`` and the desired specs; ``_EXECUTORS`` maps each
action kind to the function that carries it out, and ``_REPLACEMENTS`` each update strategy
of a ``replace`` to its own. Each returns the container acted on and a line for the receipt.

Failures leave a state the next pass converges from: a container that failed its gate is
removed (the next pass sees it missing and creates it again, or the agent rolls back first);
replacements create the new container under a temporary name (``<name>-NEXT``) before the old
one is touched, so a create that Podman refuses leaves the old container running, and a
temporary container left by a crash is managed, undesired, and so removed by the next plan.

What it may not do: decide what to change (only the plan does), act on a plan with conflicts
(an unmanaged container holding a desired name: refused before any change), go on after a
failed action, or let a podman-py exception out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.core.containerplan import Action, ActionKind, ContainerPlan
from reconciler.core.errors import ContainerError, ReconcilerError, SnapshotFaultError
from reconciler.core.specs import ContainerSpec, UpdateStrategy
from reconciler.runtime import containers, health
from reconciler.runtime.client import PodmanConnection
from reconciler.runtime.pull import pull

__all__ = ["TEMPORARY_SUFFIX", "ActionOutcome", "Execution", "carry_out"]

# Runtime names are lowercase, so no desired container can ever be called "<name>-NEXT".
TEMPORARY_SUFFIX = "-NEXT"
# Kinds whose action names a desired container, and so needs its spec.
_NEEDS_SPEC: frozenset[ActionKind] = frozenset({"create", "replace", "start", "notify"})


@dataclass(frozen=True)
class ActionOutcome:
    """What happened to one plan action, for the apply receipt."""

    action: Action
    ok: bool
    message: str
    container_id: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.to_json(),
            "ok": self.ok,
            "message": self.message,
            "container_id": self.container_id,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Execution:
    """What carrying out one plan needs besides the plan."""

    connection: PodmanConnection
    settle_s: float  # how long a container without health check must stay up
    auth_file: Path | None  # registry_auth_file, for pulls
    allow_pull: bool


@dataclass(frozen=True)
class _Step:
    """One action being carried out, with its desired spec if its kind has one."""

    action: Action
    where: str  # how messages name the action: runtime, kind and container
    desired: ContainerSpec | None

    @property
    def spec(self) -> ContainerSpec:
        assert self.desired is not None  # carry_out checked every such action has its spec
        return self.desired

    @property
    def container_id(self) -> str:
        assert self.action.container_id is not None  # the plan sets it for these kinds
        return self.action.container_id


# The container acted on (None for a pull) and what happened, for the receipt.
_Done = tuple[str | None, str]
_Executor = Callable[[Execution, _Step], _Done]


def carry_out(
    run: Execution,
    plan: ContainerPlan,
    *,
    desired: Sequence[ContainerSpec],
    on_outcome: Callable[[ActionOutcome], None] | None = None,
) -> list[ActionOutcome]:
    """Carry out ``plan``'s actions in order; stop at the first failure.

    Returns one ``ActionOutcome`` per action on success. On failure the failed action's
    outcome (``ok=False``) is passed to ``on_outcome`` like the successful ones before it,
    and its error is raised: the message names the runtime and action. Actions after it
    are not attempted.
    """
    specs = _specs_for(plan, desired)
    outcomes: list[ActionOutcome] = []

    def report(
        action: Action, started: float, *, ok: bool, message: str, container_id: str | None
    ) -> None:
        outcome = ActionOutcome(
            action=action,
            ok=ok,
            message=message,
            container_id=container_id,
            seconds=time.monotonic() - started,
        )
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    for action in plan.actions:
        started = time.monotonic()
        try:
            container_id, message = _execute(run, action, specs)
        except ReconcilerError as exc:
            report(
                action, started, ok=False, message=exc.one_line(), container_id=action.container_id
            )
            raise
        report(action, started, ok=True, message=message, container_id=container_id)
    return outcomes


def _specs_for(plan: ContainerPlan, desired: Sequence[ContainerSpec]) -> dict[str, ContainerSpec]:
    """The desired specs by runtime, once the plan is known to be one this can carry out."""
    if plan.conflicts:
        raise ContainerError("; ".join(c.describe() for c in plan.conflicts))
    specs = {spec.runtime: spec for spec in desired}
    for action in plan.actions:
        if action.kind in _NEEDS_SPEC and (
            action.runtime not in specs or specs[action.runtime].name != action.container
        ):
            raise ValueError(f"plan action {action.describe()!r} has no desired spec")
    return specs


def _execute(run: Execution, action: Action, specs: Mapping[str, ContainerSpec]) -> _Done:
    executor = _EXECUTORS.get(action.kind)
    if executor is None:
        raise ValueError(f"unknown action kind {action.kind!r}")
    where = f"runtime {action.runtime or '?'}: {action.kind} {action.container}"
    spec = specs[action.runtime] if action.kind in _NEEDS_SPEC else None
    return executor(run, _Step(action, where, spec))


# --- one executor per action kind ----------------------------------------------------------


def _pull(run: Execution, step: _Step) -> _Done:
    assert step.action.image is not None  # the plan sets it for a pull
    try:
        image_id = pull(
            run.connection, step.action.image, allow_pull=run.allow_pull, auth_file=run.auth_file
        )
    except ReconcilerError as exc:
        raise type(exc)(f"{step.where}: {exc.one_line()}") from exc
    return None, f"image {image_id[:12]} present"


def _remove(run: Execution, step: _Step) -> _Done:
    containers.remove(run.connection, step.container_id, where=step.where)
    return step.container_id, "removed"


def _create(run: Execution, step: _Step) -> _Done:
    spec = step.spec
    new_id = containers.create(run.connection, spec, name=spec.name, where=step.where)
    _start_gated(run, new_id, spec=spec, where=step.where)
    return new_id, "created and started"


def _start(run: Execution, step: _Step) -> _Done:
    _start_gated(run, step.container_id, spec=step.spec, where=step.where)
    return step.container_id, "started"


def _replace(run: Execution, step: _Step) -> _Done:
    # The plan gives every replace its runtime's strategy; stop-first never runs two at once.
    strategy: UpdateStrategy = step.action.strategy or "stop-first"
    return _REPLACEMENTS[strategy](run, step)


def _notify(run: Execution, step: _Step) -> _Done:
    how = step.action.notify or step.spec.notify
    if how == "restart":
        return _notify_by_restart(run, step)
    return _notify_by_signal(run, step, signal=how.removeprefix("signal:"))


# --- replacement strategies ----------------------------------------------------------------


def _replace_stop_first(run: Execution, step: _Step) -> _Done:
    # Created (not started) before the old one stops: if Podman refuses the definition
    # (a CDI device it does not know, a mount it cannot make) the old one keeps serving.
    connection, spec, where, old_id = run.connection, step.spec, step.where, step.container_id
    new_id = _create_temporary(run, step)
    containers.remove(connection, old_id, where=where)
    containers.rename(connection, new_id, name=spec.name, where=where)
    _start_gated(run, new_id, spec=spec, where=where)
    return new_id, f"replaced {old_id[:12]} (stop-first)"


def _replace_start_first(run: Execution, step: _Step) -> _Done:
    connection, spec, where, old_id = run.connection, step.spec, step.where, step.container_id
    new_id = _create_temporary(run, step)
    _start_gated(run, new_id, spec=spec, where=where)
    # Only now, with the new one healthy, does the old one go.
    containers.remove(connection, old_id, where=where)
    containers.rename(connection, new_id, name=spec.name, where=where)
    return new_id, f"replaced {old_id[:12]} (start-first)"


def _create_temporary(run: Execution, step: _Step) -> str:
    """Create the replacement beside the old container, under the temporary name."""
    temporary = step.spec.name + TEMPORARY_SUFFIX
    containers.clear_temporary(run.connection, temporary, where=step.where)
    return containers.create(run.connection, step.spec, name=temporary, where=step.where)


# --- notifications -------------------------------------------------------------------------


def _notify_by_restart(run: Execution, step: _Step) -> _Done:
    containers.restart(run.connection, step.container_id, where=step.where)
    _gated(run, step.container_id, spec=step.spec, where=step.where)
    return step.container_id, "restarted"


def _notify_by_signal(run: Execution, step: _Step, *, signal: str) -> _Done:
    # Taken before the signal: a process that dies of it and is restarted by Podman must
    # not look like the same healthy container.
    baseline = health.liveness(run.connection, step.container_id, where=step.where)
    containers.kill(run.connection, step.container_id, signal=signal, where=step.where)
    _gated(run, step.container_id, spec=step.spec, where=step.where, baseline=baseline)
    return step.container_id, f"sent SIG{signal}"


# --- starting behind the health gate -------------------------------------------------------


def _start_gated(run: Execution, container_id: str, *, spec: ContainerSpec, where: str) -> None:
    containers.start(run.connection, container_id, where=where)
    _gated(run, container_id, spec=spec, where=where)


def _gated(
    run: Execution,
    container_id: str,
    *,
    spec: ContainerSpec,
    where: str,
    baseline: health.Liveness | None = None,
) -> None:
    """The health gate; a container that fails it is removed before the error goes on."""
    try:
        health.gate(
            run.connection,
            container_id,
            spec=spec,
            settle_s=run.settle_s,
            where=where,
            baseline=baseline,
        )
    except SnapshotFaultError:
        containers.discard(run.connection, container_id)
        raise


_EXECUTORS: Mapping[ActionKind, _Executor] = {
    "pull": _pull,
    "remove": _remove,
    "replace": _replace,
    "create": _create,
    "start": _start,
    "notify": _notify,
}
_REPLACEMENTS: Mapping[UpdateStrategy, _Executor] = {
    "stop-first": _replace_stop_first,
    "start-first": _replace_start_first,
}
