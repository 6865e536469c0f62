"""The Podman edge: observe runtime containers, pull pinned images, carry out a container plan.

Workflow position: desired → plan → **containers** (apply). The agent builds the desired specs
(``reconciler.core.specs``), observes with ``PodmanEdge.observe()``, plans with
``reconciler.core.containerplan.plan_containers()`` and hands the plan to ``PodmanEdge.apply()``.

``PodmanEdge`` is the runtime edge's one door: callers outside ``reconciler.runtime`` use it
and ``ActionOutcome``, nothing else of the Podman side. Behind it, each part is its own module:

* ``client`` — the podman-py connection, the timeouts of its calls, the mapping of errors;
* ``observe`` — the managed containers, by label;
* ``pull`` — images by digest, with credentials from ``registry_auth`` (containers-auth.json);
* ``executor`` — the plan's actions in order, built from ``containers`` (create, start, stop,
  remove, rename, signal, networks) and ``health`` (the gate after each start).

Rules the package keeps, whichever module carries them out:

* Every API call has a timeout (podman-py's default is to wait forever).
* No podman-py, requests or urllib3 exception leaves the package; each is mapped with
  ``raise … from exc``:

  - the service cannot be reached (socket missing, refused, timed out) → ``PodmanUnavailableError``;
  - an image cannot be pulled or has another digest than its pin → ``RegistryError``;
  - the service refuses an operation that is not the snapshot's doing (create, stop, remove,
    rename, a name already taken, a network that is not ours) → ``ContainerError``;
  - a container that will not start, exits, is restarted by Podman or fails its health check
    while being gated → ``SnapshotFaultError``. Only this one makes the agent roll back and
    quarantine the snapshot (docs/contract.md §5).

* A container without the managed label is never stopped, removed, renamed or signalled, and a
  plan with conflicts (such a container holding a desired name) is refused before any change.
* Passwords from the registry auth file never appear in messages or logs.

What this module may not do: hold logic of its own beyond wiring settings to those parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from reconciler.core.containerplan import ContainerPlan, ObservedContainer
from reconciler.core.specs import NETWORK_NAME, ContainerSpec
from reconciler.runtime import observe as observing
from reconciler.runtime import pull as pulling
from reconciler.runtime.client import PodmanConnection
from reconciler.runtime.executor import TEMPORARY_SUFFIX, ActionOutcome, Execution, carry_out

__all__ = ["TEMPORARY_SUFFIX", "ActionOutcome", "PodmanEdge"]


class PodmanEdge:
    """A connection to one Podman API service. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30,
        pull_timeout_s: float = 600,
        stop_timeout_s: int = 10,
        settle_s: float = 2.0,
        registry_auth_file: str | Path | None = None,
    ) -> None:
        """Connect (no request yet); ``SettingsError`` if ``url`` is not usable.

        ``timeout_s`` bounds each ordinary API call. ``pull_timeout_s`` is the longest Podman
        may stay silent during a pull: it is a socket read timeout, and Podman reports each
        layer when it starts, not bytes, so one huge layer on a slow link needs a larger
        value. ``stop_timeout_s`` is the SIGTERM → SIGKILL grace when stopping;
        ``settle_s`` how long a container without health check must stay up.
        ``registry_auth_file`` (containers-auth.json(5)) is read at each pull, not here.
        """
        self.registry_auth_file = Path(registry_auth_file) if registry_auth_file else None
        self.settle_s = settle_s
        self._connection = PodmanConnection(
            url,
            timeout_s=timeout_s,
            pull_timeout_s=pull_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def url(self) -> str:
        return self._connection.url

    @property
    def timeout_s(self) -> float:
        return self._connection.timeout_s

    @property
    def pull_timeout_s(self) -> float:
        return self._connection.pull_timeout_s

    @property
    def stop_timeout_s(self) -> int:
        return self._connection.stop_timeout_s

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> PodmanEdge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ping(self) -> None:
        """Raise ``PodmanUnavailableError`` unless the service answers."""
        self._connection.ping()

    def observe(self) -> list[ObservedContainer]:
        """Managed containers, plus unmanaged ones whose name could collide. Sorted by name."""
        return observing.observe(self._connection)

    def container_ip(self, container: str, *, network: str = NETWORK_NAME) -> str | None:
        """The container's address on ``network`` (tests probe runtimes through it)."""
        return observing.container_ip(self._connection, container, network=network)

    def has_image(self, image: str) -> bool:
        """Whether an image with the pinned digest of ``image`` is in local storage."""
        return pulling.local_image_id(self._connection, image) is not None

    def pull(self, image: str, *, allow_pull: bool = True) -> str:
        """Make sure the pinned ``image`` is in local storage; return its image id.

        Nothing is fetched if an image with that digest is already there. With
        ``allow_pull=False`` (``reconcile once --offline``) a missing image is a
        ``RegistryError`` instead of a registry request.
        """
        return pulling.pull(
            self._connection, image, allow_pull=allow_pull, auth_file=self.registry_auth_file
        )

    def apply(
        self,
        plan: ContainerPlan,
        desired: Sequence[ContainerSpec],
        *,
        allow_pull: bool = True,
        on_outcome: Callable[[ActionOutcome], None] | None = None,
    ) -> list[ActionOutcome]:
        """Carry out ``plan``'s actions in order; stop at the first failure.

        Returns one ``ActionOutcome`` per action on success. On failure the failed action's
        outcome (``ok=False``) is passed to ``on_outcome`` like the successful ones before it,
        and its error is raised: the message names the runtime and action. Actions after it
        are not attempted.
        """
        run = Execution(
            connection=self._connection,
            settle_s=self.settle_s,
            auth_file=self.registry_auth_file,
            allow_pull=allow_pull,
        )
        return carry_out(run, plan, desired=desired, on_outcome=on_outcome)
