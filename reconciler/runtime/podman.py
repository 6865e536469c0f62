"""The Podman edge: observe runtime containers, pull pinned images, carry out a container plan.

Workflow position: desired → plan → **containers** (apply). The agent builds the desired specs
(``reconciler.desired``), observes with ``PodmanEdge.observe()``, plans with
``reconciler.plan.plan()`` and hands the plan to ``PodmanEdge.apply()``.

This is the only module that talks to Podman (through podman-py). Rules it keeps:

* Every API call has a timeout: the client's ``timeout_s``, ``pull_timeout_s`` for pulls, the
  health check's own ``timeout_s`` for each probe, and stop timeouts plus ``timeout_s`` for
  stop/restart (podman-py's default is to wait forever).
* No podman-py, requests or urllib3 exception leaves the module; each is mapped with
  ``raise … from exc``:

  - the service cannot be reached (socket missing, refused, timed out) → ``PodmanUnavailableError``;
  - an image cannot be pulled or has another digest than its pin → ``RegistryError``;
  - the service refuses an operation that is not the snapshot's doing (create, stop, remove,
    rename, a name already taken, a network that is not ours) → ``ContainerError``;
  - a container that will not start, exits, is restarted by Podman or fails its health check
    while being gated → ``SnapshotFaultError``. Only this one makes the agent roll back and
    quarantine the snapshot (contract §5).

* A container without the managed label is never stopped, removed, renamed or signalled, and a
  plan with conflicts (such a container holding a desired name) is refused before any change.

Registry credentials (setting ``registry_auth_file``, a containers-auth.json(5) file): when an
image has to be pulled, the file is read and the entry for the image's registry is looked up,
most specific key first (``host/namespace/repo``, then ``host/namespace``, then ``host``); its
user and password go to Podman with that one pull (the ``X-Registry-Auth`` header, as
podman-py's ``ImagesManager.pull(auth_config=…)`` sends them). No matching entry: the pull goes
without credentials and the Podman service's own apply. A file that is missing, unreadable or
malformed fails that pull (``RegistryError``, from the ``SettingsError`` that says what is
wrong with the file), like any other pull failure. Passwords never appear in messages or logs.

Health is checked by the agent (Podman's own health timers need systemd): after a container is
started, restarted or signalled, it must keep running, and if its spec has a health check, the
command must exit 0 within its timeout on one of ``retries`` tries ``interval_s`` apart (counted
after ``start_period_s``). Without a health check it must stay running for ``settle_s``.

Failures leave a state the next pass converges from: a container that failed its gate is
removed (the next pass sees it missing and creates it again, or the agent rolls back first);
replacements create the new container under a temporary name (``<name>-NEXT``) before the old
one is touched, so a create that Podman refuses leaves the old container running, and a
temporary container left by a crash is managed, undesired, and so removed by the next plan.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import urllib3.exceptions
from podman import PodmanClient
from podman.api import encode_auth_header
from podman.errors import APIError, PodmanError

from reconciler.core.containerplan import Action, ObservedContainer, Plan
from reconciler.core.documents import HealthCheck
from reconciler.core.errors import (
    ContainerError,
    PodmanUnavailableError,
    ReconcilerError,
    RegistryError,
    SettingsError,
    SnapshotFaultError,
)
from reconciler.core.specs import LABEL_MANAGED, LOOPBACK, NETWORK_NAME, ContainerSpec

__all__ = [
    "TEMPORARY_SUFFIX",
    "ActionOutcome",
    "PodmanEdge",
    "RegistryCredentials",
    "auth_scopes",
    "load_registry_auth",
    "match_auth_key",
    "registry_credentials",
]

# Runtime names are lowercase, so no desired container can ever be called "<name>-NEXT".
TEMPORARY_SUFFIX = "-NEXT"
_CONTAINER_PREFIX_FILTER = "^reconciler-"
# What a podman-py call can raise besides our own errors: APIError and every requests error are
# OSErrors; urllib3 may leak from streamed bodies; ValueError/KeyError from odd responses.
_THIRD_PARTY = (OSError, PodmanError, urllib3.exceptions.HTTPError, ValueError, KeyError)
_MESSAGE_LIMIT = 300  # characters of a Podman or container message kept in an error line
_AUTH_FILE_LIMIT = 1 << 20  # bytes: a containers-auth.json is a few hundred
# Spellings of Docker Hub in auth files and image names; containers/image treats them as one.
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


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
class _Live:
    status: str
    exit_code: int
    restart_count: int
    started_at: str

    @property
    def running(self) -> bool:
        return self.status == "running"


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
        self.url = url
        # containers-auth.json(5) with credentials for pulls; read at each pull, not here.
        self.registry_auth_file = Path(registry_auth_file) if registry_auth_file else None
        self.timeout_s = timeout_s  # each ordinary API call
        # The longest Podman may stay silent during a pull: it is a socket read timeout, and
        # Podman reports each layer when it starts, not bytes, so one huge layer on a slow
        # link needs a larger value.
        self.pull_timeout_s = pull_timeout_s
        self.stop_timeout_s = stop_timeout_s  # SIGTERM → SIGKILL grace when stopping
        self.settle_s = settle_s  # how long a container without health check must stay up
        self._client = self._connect(timeout_s)
        self._probe_clients: dict[int, Any] = {}

    def _connect(self, timeout_s: float) -> Any:
        try:
            return PodmanClient(base_url=self.url, timeout=timeout_s)
        except (*_THIRD_PARTY, TypeError) as exc:
            raise SettingsError(f"podman_url {self.url!r} is not usable: {_line(exc)}") from exc

    def close(self) -> None:
        for client in (self._client, *self._probe_clients.values()):
            with contextlib.suppress(*_THIRD_PARTY):
                client.close()
        self._probe_clients.clear()

    def __enter__(self) -> PodmanEdge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- error mapping ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Map whatever podman-py raises while ``doing`` to the project's errors."""
        try:
            yield
        except ReconcilerError:
            raise
        except _THIRD_PARTY as exc:
            self._raise_mapped(exc, doing)

    def _raise_mapped(self, exc: BaseException, doing: str) -> NoReturn:
        if _answered(exc):
            raise ContainerError(f"{doing}: Podman refused: {_api_reason(exc)}") from exc
        raise PodmanUnavailableError(
            f"Podman at {self.url} unreachable while {doing}: {_root_reason(exc)}"
        ) from exc

    # --- reading ---------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise ``PodmanUnavailableError`` unless the service answers."""
        with self._guard("pinging the service"):
            ok = self._client.ping()
        if not ok:
            raise PodmanUnavailableError(f"Podman at {self.url} does not answer its ping")

    def observe(self) -> list[ObservedContainer]:
        """Managed containers, plus unmanaged ones whose name could collide. Sorted by name.

        Managed containers are found by label; unmanaged ones are listed only if their name
        starts with ``reconciler-``, as only those can hold a desired container's name. Two
        list calls and no inspection: libpod's list entries carry the id, name, state,
        labels, image and image id exactly as an inspect does, in every state (compared on
        Podman 4.3: created, running, paused, exited, stopped), and inspecting each container
        cost one round trip apiece, a tenth of a converged ``once`` (bench/noop.py).
        """
        with self._guard("listing containers"):
            managed = self._client.containers.list(
                all=True, filters={"label": f"{LABEL_MANAGED}=true"}
            )
            named = self._client.containers.list(
                all=True, filters={"name": _CONTAINER_PREFIX_FILTER}
            )
        seen: dict[str, ObservedContainer] = {}
        for container in managed:
            seen[container.id] = _listed(container.id, container.attrs)
        for container in named:
            observed = _listed(container.id, container.attrs)
            if container.id in seen or not observed.name.startswith("reconciler-"):
                continue
            seen[container.id] = observed
        return sorted(seen.values(), key=lambda c: c.name)

    def container_ip(self, container: str, *, network: str = NETWORK_NAME) -> str | None:
        """The container's address on ``network`` (tests probe runtimes through it)."""
        with self._guard(f"inspecting container {container}"):
            attrs = self._client.containers.get(container).attrs
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        address = (networks.get(network) or {}).get("IPAddress")
        return str(address) if address else None

    def has_image(self, image: str) -> bool:
        """Whether an image with the pinned digest of ``image`` is in local storage."""
        return self._local_image_id(image) is not None

    def _local_image_id(self, image: str) -> str | None:
        digest = image.rsplit("@", 1)[-1]
        try:
            with self._guard(f"looking up image {image}"):
                attrs = self._client.images.get(image).attrs
        except ContainerError as exc:
            if _status(exc.__cause__) == 404:
                return None
            raise
        # The digest is what the pin promises; the repository part may be spelled differently
        # by Podman (normalised names), so only the digest is compared.
        repo_digests = [str(entry) for entry in attrs.get("RepoDigests") or []]
        if any(entry.endswith("@" + digest) for entry in repo_digests):
            return str(attrs["Id"])
        return None

    # --- images ----------------------------------------------------------------------------

    def pull(self, image: str, *, allow_pull: bool = True) -> str:
        """Make sure the pinned ``image`` is in local storage; return its image id.

        Nothing is fetched if an image with that digest is already there. With
        ``allow_pull=False`` (``reconcile once --offline``) a missing image is a
        ``RegistryError`` instead of a registry request.
        """
        local = self._local_image_id(image)
        if local is not None:
            return local
        if not allow_pull:
            raise RegistryError(f"image {image} is not on this node and pulling is off (offline)")
        doing = f"pulling {image}"
        headers: dict[str, str] = {}
        if self.registry_auth_file is not None:
            try:
                credentials = registry_credentials(image, self.registry_auth_file)
            except SettingsError as exc:
                raise RegistryError(f"{doing}: {exc.one_line()}") from exc
            if credentials is not None:
                # Names the entry and the file, never the secret.
                doing += f" (credentials for {credentials.key} from {self.registry_auth_file})"
                encoded = encode_auth_header(credentials.auth_config())
                headers["X-Registry-Auth"] = encoded.decode("ascii")
        try:
            response = self._client.api.post(
                "/images/pull",
                params={"reference": image, "policy": "missing"},
                headers=headers or None,
                timeout=self.pull_timeout_s,
            )
            status = int(response.status_code)
            body = str(response.text)
        except _THIRD_PARTY as exc:
            if _timed_out(exc):
                raise RegistryError(
                    f"{doing}: Podman silent for {self.pull_timeout_s:g} s (pull_timeout_s)"
                ) from exc
            self._raise_mapped(exc, doing)
        if status >= 400:
            raise RegistryError(f"{doing}: Podman answered {status}: {_body_reason(body)}")
        # The libpod pull endpoint answers 200 before it knows the outcome and streams one
        # JSON object per line; a failed pull shows up as an "error" line.
        for line in body.splitlines():
            with contextlib.suppress(ValueError):
                report = json.loads(line)
                if isinstance(report, dict) and report.get("error"):
                    raise RegistryError(f"{doing}: {_clip(str(report['error']))}")
        pulled = self._local_image_id(image)
        if pulled is None:
            raise RegistryError(f"{doing}: the pulled image does not carry the pinned digest")
        return pulled

    # --- apply -----------------------------------------------------------------------------

    def apply(
        self,
        plan: Plan,
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
        if plan.conflicts:
            raise ContainerError("; ".join(c.describe() for c in plan.conflicts))
        specs = {spec.runtime: spec for spec in desired}
        for action in plan.actions:
            if action.kind in ("create", "replace", "start", "notify") and (
                action.runtime not in specs or specs[action.runtime].name != action.container
            ):
                raise ValueError(f"plan action {action.describe()!r} has no desired spec")

        outcomes: list[ActionOutcome] = []
        for action in plan.actions:
            started = time.monotonic()
            try:
                container_id, message = self._carry_out(action, specs, allow_pull=allow_pull)
            except ReconcilerError as exc:
                failed = ActionOutcome(
                    action=action,
                    ok=False,
                    message=exc.one_line(),
                    container_id=action.container_id,
                    seconds=time.monotonic() - started,
                )
                outcomes.append(failed)
                if on_outcome is not None:
                    on_outcome(failed)
                raise
            outcome = ActionOutcome(
                action=action,
                ok=True,
                message=message,
                container_id=container_id,
                seconds=time.monotonic() - started,
            )
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return outcomes

    def _carry_out(
        self, action: Action, specs: dict[str, ContainerSpec], *, allow_pull: bool
    ) -> tuple[str | None, str]:
        where = f"runtime {action.runtime or '?'}: {action.kind} {action.container}"
        if action.kind == "pull":
            assert action.image is not None
            try:
                image_id = self.pull(action.image, allow_pull=allow_pull)
            except ReconcilerError as exc:
                raise type(exc)(f"{where}: {exc.one_line()}") from exc
            return None, f"image {image_id[:12]} present"
        if action.kind == "remove":
            assert action.container_id is not None
            self._remove(action.container_id, where=where)
            return action.container_id, "removed"
        spec = specs[action.runtime]
        if action.kind == "create":
            new_id = self._create(spec, name=spec.name, where=where)
            self._start_gated(new_id, spec, where=where)
            return new_id, "created and started"
        assert action.container_id is not None
        if action.kind == "replace":
            if action.strategy == "start-first":
                return self._replace_start_first(action.container_id, spec, where=where)
            return self._replace_stop_first(action.container_id, spec, where=where)
        if action.kind == "start":
            self._start_gated(action.container_id, spec, where=where)
            return action.container_id, "started"
        if action.kind == "notify":
            return action.container_id, self._notify(action, spec, where=where)
        raise ValueError(f"unknown action kind {action.kind!r}")

    def _replace_stop_first(
        self, old_id: str, spec: ContainerSpec, *, where: str
    ) -> tuple[str, str]:
        # Created (not started) before the old one stops: if Podman refuses the definition
        # (a CDI device it does not know, a mount it cannot make) the old one keeps serving.
        temporary = spec.name + TEMPORARY_SUFFIX
        self._clear_temporary(temporary, where=where)
        new_id = self._create(spec, name=temporary, where=where)
        self._remove(old_id, where=where)
        self._rename(new_id, spec.name, where=where)
        self._start_gated(new_id, spec, where=where)
        return new_id, f"replaced {old_id[:12]} (stop-first)"

    def _replace_start_first(
        self, old_id: str, spec: ContainerSpec, *, where: str
    ) -> tuple[str, str]:
        temporary = spec.name + TEMPORARY_SUFFIX
        self._clear_temporary(temporary, where=where)
        new_id = self._create(spec, name=temporary, where=where)
        self._start_gated(new_id, spec, where=where)
        # Only now, with the new one healthy, does the old one go.
        self._remove(old_id, where=where)
        self._rename(new_id, spec.name, where=where)
        return new_id, f"replaced {old_id[:12]} (start-first)"

    def _notify(self, action: Action, spec: ContainerSpec, *, where: str) -> str:
        assert action.container_id is not None
        container_id = action.container_id
        how = action.notify or spec.notify
        if how == "restart":
            with self._guard(f"{where}: restarting"):
                response = self._client.api.post(
                    f"/containers/{container_id}/restart",
                    params=self._stop_params(),
                    timeout=self.stop_timeout_s + self.timeout_s,
                )
            self._check_started(response, container_id, where=where, doing="restart")
            self._gate(container_id, spec, where=where, baseline=None)
            return "restarted"
        signal = how.removeprefix("signal:")
        # Taken before the signal: a process that dies of it and is restarted by Podman must
        # not look like the same healthy container.
        baseline = self._live(container_id, where=where)
        with self._guard(f"{where}: sending SIG{signal}"):
            response = self._client.api.post(
                f"/containers/{container_id}/kill", params={"signal": signal}
            )
            response.raise_for_status()
        self._gate(container_id, spec, where=where, baseline=baseline)
        return f"sent SIG{signal}"

    # --- container operations ------------------------------------------------------------

    def _create(self, spec: ContainerSpec, *, name: str, where: str) -> str:
        if spec.network is not None:
            self._ensure_network(spec.network, where=where)
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
        else:
            options["networks"] = {spec.network: {}}
            published: dict[str, list[tuple[str, int]]] = {}
            for port in spec.ports:
                key = f"{port.container}/{port.protocol}"
                published.setdefault(key, []).append((LOOPBACK, port.host))
            options["ports"] = published
        command = list(spec.command) if spec.command is not None else None
        with self._guard(f"{where}: creating {name}"):
            container = self._client.containers.create(spec.image, command, **options)
        return str(container.id)

    def _ensure_network(self, network: str, *, where: str) -> None:
        try:
            with self._guard(f"{where}: looking up network {network}"):
                attrs = self._client.networks.get(network).attrs
        except ContainerError as exc:
            if _status(exc.__cause__) != 404:
                raise
            with self._guard(f"{where}: creating network {network}"):
                self._client.networks.create(
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

    def _clear_temporary(self, name: str, *, where: str) -> None:
        """Remove a managed leftover called ``name``; refuse if an unmanaged one has it."""
        for observed in self.observe():
            if observed.name != name:
                continue
            if not observed.managed:
                raise ContainerError(
                    f"{where}: container {name} exists without the managed label; "
                    "rename or remove it"
                )
            self._remove(observed.id, where=where)

    def _start_gated(self, container_id: str, spec: ContainerSpec, *, where: str) -> None:
        with self._guard(f"{where}: starting"):
            response = self._client.api.post(f"/containers/{container_id}/start")
        self._check_started(response, container_id, where=where, doing="start")
        self._gate(container_id, spec, where=where, baseline=None)

    def _check_started(self, response: Any, container_id: str, *, where: str, doing: str) -> None:
        status = int(response.status_code)
        if status < 400 or status == 304:
            return
        if status == 404:
            raise ContainerError(f"{where}: container {container_id[:12]} is gone")
        # Podman could not start what the snapshot defined (no such executable, a port in
        # use, a device that will not attach): the snapshot's fault by contract §5.
        reason = _body_reason(str(response.text))
        self._discard(container_id)
        raise SnapshotFaultError(f"{where}: container would not {doing}: {reason}")

    def _stop_params(self) -> dict[str, int]:
        # The libpod API of Podman 4 reads "timeout" for stop and restart (it ignores "t", and
        # a restart without it kills at once); later versions read "t" for restart. Both are
        # sent, unknown query keys are ignored.
        return {"timeout": self.stop_timeout_s, "t": self.stop_timeout_s}

    def _remove(self, container_id: str, *, where: str) -> None:
        """Stop (with the stop timeout) and delete; a container already gone is fine."""
        with self._guard(f"{where}: stopping {container_id[:12]}"):
            response = self._client.api.post(
                f"/containers/{container_id}/stop",
                params=self._stop_params(),
                timeout=self.stop_timeout_s + self.timeout_s,
            )
        if int(response.status_code) not in (204, 304, 404):
            raise ContainerError(
                f"{where}: Podman would not stop {container_id[:12]}: "
                f"{_body_reason(str(response.text))}"
            )
        with self._guard(f"{where}: removing {container_id[:12]}"):
            response = self._client.api.delete(
                f"/containers/{container_id}",
                params={"force": True},
                timeout=self.stop_timeout_s + self.timeout_s,
            )
        if int(response.status_code) >= 400 and int(response.status_code) != 404:
            raise ContainerError(
                f"{where}: Podman would not remove {container_id[:12]}: "
                f"{_body_reason(str(response.text))}"
            )

    def _discard(self, container_id: str) -> None:
        """Best-effort removal of a container that failed its gate (the error is the news)."""
        with contextlib.suppress(ReconcilerError):
            self._remove(container_id, where="discarding a failed container")

    def _rename(self, container_id: str, name: str, *, where: str) -> None:
        with self._guard(f"{where}: renaming {container_id[:12]} to {name}"):
            response = self._client.api.post(
                f"/containers/{container_id}/rename", params={"name": name}
            )
            response.raise_for_status()

    # --- the gate --------------------------------------------------------------------------

    def _live(self, container_id: str, *, where: str) -> _Live:
        with self._guard(f"{where}: inspecting {container_id[:12]}"):
            attrs = self._client.containers.get(container_id).attrs
        state = attrs.get("State") or {}
        return _Live(
            status=str(state.get("Status", "")),
            exit_code=int(state.get("ExitCode") or 0),
            restart_count=int(attrs.get("RestartCount") or 0),
            started_at=str(state.get("StartedAt", "")),
        )

    def _gate(
        self, container_id: str, spec: ContainerSpec, *, where: str, baseline: _Live | None
    ) -> None:
        """Wait until the container counts as up; on failure remove it and raise."""
        try:
            first = baseline or self._live(container_id, where=where)
            self._check_alive(container_id, first, first, where=where)
            health = spec.health
            if health is None:
                self._stay_up(container_id, first, seconds=self.settle_s, where=where)
            else:
                self._stay_up(container_id, first, seconds=health.start_period_s, where=where)
                self._probe_until_healthy(container_id, health, first, where=where)
        except SnapshotFaultError:
            self._discard(container_id)
            raise

    def _stay_up(self, container_id: str, first: _Live, *, seconds: float, where: str) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._check_alive(
                container_id, first, self._live(container_id, where=where), where=where
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.2, remaining))

    def _check_alive(self, container_id: str, first: _Live, now: _Live, *, where: str) -> None:
        if not now.running:
            raise SnapshotFaultError(
                f"{where}: container {now.status} with exit code {now.exit_code}"
                f"{self._log_tail(container_id)}"
            )
        if now.restart_count != first.restart_count or now.started_at != first.started_at:
            raise SnapshotFaultError(
                f"{where}: container exited and was restarted by Podman"
                f"{self._log_tail(container_id)}"
            )

    def _probe_until_healthy(
        self, container_id: str, health: HealthCheck, first: _Live, *, where: str
    ) -> None:
        last = ""
        for attempt in range(1, health.retries + 1):
            self._check_alive(
                container_id, first, self._live(container_id, where=where), where=where
            )
            healthy, last = self._probe(container_id, health, where=where)
            if healthy:
                return
            if attempt < health.retries:
                self._stay_up(container_id, first, seconds=health.interval_s, where=where)
        raise SnapshotFaultError(
            f"{where}: health check failed {health.retries} time(s), last: {last}"
        )

    def _probe(self, container_id: str, health: HealthCheck, *, where: str) -> tuple[bool, str]:
        """Run the health command once; (healthy, what happened)."""
        # exec_run has no timeout of its own: it uses its client's, hence a client per timeout.
        client = self._probe_clients.get(health.timeout_s)
        if client is None:
            client = self._probe_clients[health.timeout_s] = self._connect(health.timeout_s)
        try:
            container = client.containers.get(container_id)
            code, output = container.exec_run(list(health.command), demux=True)
        except _THIRD_PARTY as exc:
            if _timed_out(exc):
                return False, f"no result within {health.timeout_s} s"
            if _answered(exc):
                return False, _api_reason(exc)
            self._raise_mapped(exc, f"{where}: running the health check")
        if code == 0:
            return True, "exit 0"
        stdout, stderr = output if isinstance(output, tuple) else (output, None)
        said = _clip(b"".join(part or b"" for part in (stderr, stdout)).decode(errors="replace"))
        return False, f"exit {code}" + (f" ({said})" if said else "")

    def _log_tail(self, container_id: str) -> str:
        """The last lines the container wrote, as a suffix for an error line ("" if none)."""
        try:
            container = self._client.containers.get(container_id)
            frames = container.logs(stdout=True, stderr=True, tail=3)
            data = frames if isinstance(frames, bytes) else b"".join(frames)
        except _THIRD_PARTY:
            return ""  # the failure itself is the message; missing logs must not replace it
        text = _clip(data.decode(errors="replace"))
        return f"; last output: {text}" if text else ""


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


# --- registry credentials ------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryCredentials:
    """The credentials an auth file holds for one image; ``repr`` leaves the password out."""

    key: str  # the auth file's key that matched, normalised (e.g. ``127.0.0.1:5000/team``)
    username: str
    password: str = field(repr=False)

    def auth_config(self) -> dict[str, str]:
        """What podman-py's ``auth_config`` takes (sent as the ``X-Registry-Auth`` header)."""
        return {"username": self.username, "password": self.password}


def _image_name(image: str) -> str:
    """``host[:port]/path`` of an image reference: without digest and tag, registry explicit.

    As Docker and containers/image read a reference, the first component is a registry only
    if it has a ``.`` or a ``:`` or is ``localhost``; otherwise the image is on Docker Hub
    (``docker.io``, ``library/`` for a single component).
    """
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1 :]:
        name = name[: name.rindex(":")]
    first, sep, rest = name.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        rest = name if sep else f"library/{name}"
        first = _DOCKER_HUB
    if first in _DOCKER_HUB_ALIASES:
        first = _DOCKER_HUB
    return f"{first}/{rest}"


def auth_scopes(image: str) -> list[str]:
    """The auth file keys that can apply to ``image``, most specific first.

    ``127.0.0.1:5000/team/web@sha256:…`` → ``127.0.0.1:5000/team/web``,
    ``127.0.0.1:5000/team``, ``127.0.0.1:5000``.
    """
    parts = _image_name(image).split("/")
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _normalise_key(key: str) -> str:
    """An auth file key as containers/image compares it.

    A key with a scheme is Docker's legacy form (``https://index.docker.io/v1/``): only its
    host counts. Docker Hub's host names all mean ``docker.io``.
    """
    stripped = key.removeprefix("http://").removeprefix("https://")
    if stripped != key:
        stripped = stripped.split("/", 1)[0]
    stripped = stripped.rstrip("/")
    host, sep, path = stripped.partition("/")
    if host in _DOCKER_HUB_ALIASES:
        host = _DOCKER_HUB
    return host + sep + path


def match_auth_key(image: str, keys: Iterable[str]) -> str | None:
    """The key among ``keys`` whose entry applies to ``image`` (most specific), or ``None``.

    Pure: ``keys`` are the auth file's keys as written; the one returned is as written too.
    A key spelled exactly as the scope wins over a legacy spelling of the same scope.
    """
    by_scope: dict[str, str] = {}
    for key in keys:
        scope = _normalise_key(key)
        if scope not in by_scope or key == scope:
            by_scope[scope] = key
    for scope in auth_scopes(image):
        if scope in by_scope:
            return by_scope[scope]
    return None


def load_registry_auth(path: Path) -> dict[str, Any]:
    """The ``auths`` object of a containers-auth.json file; ``SettingsError`` if unusable."""
    where = f"registry_auth_file {path}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(_AUTH_FILE_LIMIT + 1)
    except OSError as exc:
        raise SettingsError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > _AUTH_FILE_LIMIT:
        raise SettingsError(f"{where} is larger than {_AUTH_FILE_LIMIT} bytes")
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SettingsError(f"{where} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the text around it.
        raise SettingsError(f"{where} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(document, dict):
        raise SettingsError(f"{where} is not a JSON object")
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise SettingsError(f'{where}: "auths" is not an object')
    return auths


def _entry_credentials(key: str, entry: Any, *, where: str) -> RegistryCredentials:
    """User and password of one ``auths`` entry: ``auth`` (base64 of ``user:password``) or
    ``username`` and ``password``. Messages name the key, never a value."""
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: the entry for {key!r} is not an object")
    scope = _normalise_key(key)
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise SettingsError(f'{where}: "auth" of {key!r} is not a string')
        try:
            decoded = base64.b64decode(auth.encode("ascii")).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            decoded = ""
        user, sep, secret = decoded.partition(":")
        if not sep or not user:
            raise SettingsError(f'{where}: "auth" of {key!r} is not base64 of user:password')
        return RegistryCredentials(scope, user, secret)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return RegistryCredentials(scope, username, password)
    raise SettingsError(f'{where}: the entry for {key!r} has no "auth" nor username and password')


def registry_credentials(image: str, path: Path) -> RegistryCredentials | None:
    """The credentials ``path`` holds for ``image``; ``None`` when no entry applies.

    Raises ``SettingsError`` when the file is missing, unreadable or malformed, or when the
    entry that applies carries no usable credentials (other entries are not judged).
    """
    auths = load_registry_auth(path)
    key = match_auth_key(image, auths)
    if key is None:
        return None
    return _entry_credentials(key, auths[key], where=f"registry_auth_file {path}")


# --- error details -------------------------------------------------------------------------


def _status(exc: BaseException | None) -> int | None:
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def _answered(exc: BaseException) -> bool:
    """Whether the service answered (an HTTP error status) rather than not being reached."""
    return isinstance(exc, APIError) and _status(exc) is not None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes, and exceptions packed into their args (requests/urllib3 do that)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def _timed_out(exc: BaseException) -> bool:
    return any(
        isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError)
        or type(e).__name__.endswith("Timeout")
        for e in _chain(exc)
    )


def _root_reason(exc: BaseException) -> str:
    if _timed_out(exc):
        return "timed out"
    *_, deepest = _chain(exc)
    return _clip(str(deepest) or type(deepest).__name__)


def _api_reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return _clip(str(explanation or exc))


def _body_reason(body: str) -> str:
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        if isinstance(data, dict):
            return _clip(str(data.get("message") or data.get("cause") or body))
    return _clip(body)


def _clip(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_LIMIT else line[: _MESSAGE_LIMIT - 1] + "…"


def _line(exc: BaseException) -> str:
    return _clip(str(exc) or type(exc).__name__)
