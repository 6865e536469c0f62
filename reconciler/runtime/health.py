"""The health gate: after a start, restart or signal, wait until the container counts as up.

Workflow position: called by the executor (``reconciler.runtime.executor``) after each action
that starts or disturbs a container, before the next action runs. Health is checked by the
agent itself through the Podman API, since Podman's own health timers need systemd.

A container passes when it keeps running (same start time, same restart count as when the gate
began) and, if its spec has a health check, the command exits 0 within its ``timeout_s`` on one
of ``retries`` tries ``interval_s`` apart, counted after ``start_period_s``. Without a health
check it must stay running for ``settle_s``.

What it may not do: change the container (removing one that failed is the executor's job), or
let a podman-py exception out. A container that fails the gate is a ``SnapshotFaultError``
whose message ends with the last lines the container wrote; Podman failing to answer is
mapped as everywhere in the runtime (``PodmanConnection.guard``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reconciler.core.documents import HealthCheck
from reconciler.core.errors import SnapshotFaultError
from reconciler.core.specs import ContainerSpec
from reconciler.runtime.client import (
    THIRD_PARTY,
    PodmanConnection,
    answered,
    api_reason,
    clip,
    timed_out,
)

__all__ = ["Liveness", "gate", "liveness"]

_POLL_S = 0.2  # how often a container that must stay up is looked at


@dataclass(frozen=True)
class Liveness:
    """A container's run state as Podman reports it, to compare across the gate."""

    status: str
    exit_code: int
    restart_count: int
    started_at: str

    @property
    def running(self) -> bool:
        return self.status == "running"


def liveness(connection: PodmanConnection, container_id: str, *, where: str) -> Liveness:
    """Inspect the container's state now."""
    with connection.guard(f"{where}: inspecting {container_id[:12]}"):
        attrs = connection.client.containers.get(container_id).attrs
    state = attrs.get("State") or {}
    return Liveness(
        status=str(state.get("Status", "")),
        exit_code=int(state.get("ExitCode") or 0),
        restart_count=int(attrs.get("RestartCount") or 0),
        started_at=str(state.get("StartedAt", "")),
    )


def gate(
    connection: PodmanConnection,
    container_id: str,
    *,
    spec: ContainerSpec,
    settle_s: float,
    where: str,
    baseline: Liveness | None = None,
) -> None:
    """Return once the container counts as up; ``SnapshotFaultError`` if it does not.

    ``baseline`` is the state to compare with, when it had to be taken before the action
    (a signal); by default the state at the gate's start.
    """
    first = baseline or liveness(connection, container_id, where=where)
    watch = _Watch(connection, container_id, where=where, first=first)
    watch.check(first)
    health = spec.health
    if health is None:
        watch.stay_up(settle_s)
    else:
        watch.stay_up(health.start_period_s)
        watch.probe_until_healthy(health)


@dataclass(frozen=True)
class _Watch:
    """One container under the gate, and the state it must keep."""

    connection: PodmanConnection
    container_id: str
    where: str
    first: Liveness

    def now(self) -> Liveness:
        return liveness(self.connection, self.container_id, where=self.where)

    def check(self, now: Liveness) -> None:
        """Raise unless the container still runs the same process as at ``first``."""
        if not now.running:
            raise SnapshotFaultError(
                f"{self.where}: container {now.status} with exit code {now.exit_code}"
                f"{self.log_tail()}"
            )
        first = self.first
        if now.restart_count != first.restart_count or now.started_at != first.started_at:
            raise SnapshotFaultError(
                f"{self.where}: container exited and was restarted by Podman{self.log_tail()}"
            )

    def stay_up(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check(self.now())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(_POLL_S, remaining))

    def probe_until_healthy(self, health: HealthCheck) -> None:
        last = ""
        for attempt in range(1, health.retries + 1):
            self.check(self.now())
            healthy, last = self.probe(health)
            if healthy:
                return
            if attempt < health.retries:
                self.stay_up(health.interval_s)
        raise SnapshotFaultError(
            f"{self.where}: health check failed {health.retries} time(s), last: {last}"
        )

    def probe(self, health: HealthCheck) -> tuple[bool, str]:
        """Run the health command once; (healthy, what happened)."""
        # exec_run has no timeout of its own: it uses its client's, hence a client per timeout.
        client = self.connection.client_with_timeout(health.timeout_s)
        try:
            container = client.containers.get(self.container_id)
            code, output = container.exec_run(list(health.command), demux=True)
        except THIRD_PARTY as exc:
            if timed_out(exc):
                return False, f"no result within {health.timeout_s} s"
            if answered(exc):
                return False, api_reason(exc)
            self.connection.raise_mapped(exc, f"{self.where}: running the health check")
        if code == 0:
            return True, "exit 0"
        stdout, stderr = output if isinstance(output, tuple) else (output, None)
        said = clip(b"".join(part or b"" for part in (stderr, stdout)).decode(errors="replace"))
        return False, f"exit {code}" + (f" ({said})" if said else "")

    def log_tail(self) -> str:
        """The last lines the container wrote, as a suffix for an error line ("" if none)."""
        try:
            container = self.connection.client.containers.get(self.container_id)
            frames = container.logs(stdout=True, stderr=True, tail=3)
            data = frames if isinstance(frames, bytes) else b"".join(frames)
        except THIRD_PARTY:
            return ""  # the failure itself is the message; missing logs must not replace it
        text = clip(data.decode(errors="replace"))
        return f"; last output: {text}" if text else ""
