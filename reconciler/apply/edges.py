"""What the apply transaction needs from the world, and the production pieces that provide it.

Where it sits: the transaction (``apply.transaction``) and its steps (``apply.steps``) see the
model store, the container runtime, the hooks and the clock only through the small protocols
here; ``production_edges`` wires the real ones (``ModelStore``, ``PodmanEdge``, ``run_hook``,
``time.time``, ``NodeHost`` for GPUs and CDI specs) and tests pass fakes. The node's own
state (history, record, paths, settings) comes in as the ``Node``. This module decides
nothing about the apply itself.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reconciler.apply.crash import die_at
from reconciler.config.settings import Settings
from reconciler.core.cdi import HostFacts
from reconciler.core.containerplan import ContainerPlan, ObservedContainer
from reconciler.core.documents import ModelSpec
from reconciler.core.errors import DownloadError
from reconciler.core.gpus import GpuFacts, keep_known
from reconciler.core.specs import ContainerSpec
from reconciler.history.node import Node
from reconciler.models.limits import DownloadLimits
from reconciler.models.store import ModelStore
from reconciler.runtime.cdi import read_inventory
from reconciler.runtime.gpus import discover_gpus
from reconciler.runtime.hooks import HookResult, run_hook
from reconciler.runtime.podman import ActionOutcome, PodmanEdge

__all__ = [
    "Clock",
    "CrashSeam",
    "Edges",
    "GcFreed",
    "HookRunner",
    "HooksFolder",
    "HostEdge",
    "ModelsEdge",
    "NodeHost",
    "PodmanSession",
    "RuntimeEdge",
    "StoreEdge",
    "open_edge",
    "production_edges",
]


@dataclass(frozen=True, kw_only=True)
class GcFreed:
    removed_blobs: int
    freed_bytes: int


class ModelsEdge(Protocol):
    """The content-addressed model store, as the transaction uses it."""

    def not_installed(self, models: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]: ...
    def installed_ids(self) -> list[str]: ...
    def bytes_needed(self, models: Sequence[ModelSpec]) -> int: ...
    def ensure(self, models: Sequence[ModelSpec], *, offline: bool) -> None: ...
    def remove(self, model_id: str) -> None: ...
    def gc(self, keep: set[str]) -> GcFreed: ...
    def states(self, models: Sequence[ModelSpec]) -> list[dict[str, str | None]]: ...
    def verify(self) -> list[str]: ...


class RuntimeEdge(Protocol):
    """The container runtime: what runs, and carrying out a container plan."""

    def observe(self) -> list[ObservedContainer]: ...
    def apply(
        self,
        plan: ContainerPlan,
        desired: Sequence[ContainerSpec],
        /,
        *,
        allow_pull: bool,
        on_outcome: Callable[[ActionOutcome], None] | None,
    ) -> list[ActionOutcome]: ...


class HookRunner(Protocol):
    """The operator's hooks folder (``pre-apply``, ``post-apply``, ``agent-update``)."""

    @property
    def timeout_s(self) -> float: ...
    def run(self, name: str, *, env: Mapping[str, str]) -> HookResult: ...


class Clock(Protocol):
    """Wall-clock seconds since the epoch, for the record and the receipts."""

    def __call__(self) -> float: ...


class CrashSeam(Protocol):
    """Called at each step boundary with its ``CRASH_POINTS`` name (``apply.crash``)."""

    def __call__(self, point: str) -> None: ...


class HostEdge(Protocol):
    """The node's own devices: its GPUs and the CDI specs that expose them (§11)."""

    def read(self, settings: Settings) -> HostFacts: ...


@dataclass(frozen=True)
class NodeHost:
    """``HostEdge`` over NVML and the ``cdi_spec_dirs``; ``nvml`` is injected by tests."""

    nvml: Any | None = None

    def read(self, settings: Settings) -> HostFacts:
        known = _recorded_gpus(Path(settings.state_dir) / "gpus.json")
        gpus = keep_known(discover_gpus(self.nvml), known)
        return HostFacts(gpus=gpus, cdi=read_inventory(settings.cdi_spec_dirs))


def _recorded_gpus(path: Path) -> GpuFacts | None:
    """The facts the last pass recorded (``apply.steps.write_host_facts``), if readable."""
    try:
        return GpuFacts.from_json(json.loads(path.read_bytes())["gpus"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, kw_only=True)
class Edges:
    models: ModelsEdge
    runtime: RuntimeEdge
    hooks: HookRunner
    clock: Clock
    crash: CrashSeam
    host: HostEdge = field(default_factory=NodeHost)


class StoreEdge:
    """``ModelsEdge`` over the real ``ModelStore``; downloads go to the node's origin."""

    def __init__(self, store: ModelStore, *, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    def not_installed(self, models: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]:
        return tuple(m for m in models if not self._store.is_installed(m))

    def installed_ids(self) -> list[str]:
        return [installed.model_id for installed in self._store.installed_models()]

    def bytes_needed(self, models: Sequence[ModelSpec]) -> int:
        return self._store.bytes_needed(models)

    def ensure(self, models: Sequence[ModelSpec], *, offline: bool) -> None:
        if offline:
            report = self._store.ensure(models, client=None, base_url=None)
            if report.missing:
                first = report.missing[0]
                owner = next(m.id for m in models if first in m.files)
                raise DownloadError(
                    f"offline: {len(report.missing)} model file(s) are not on disk "
                    f"(first: {owner}/{first.path})"
                )
            return
        # Imported here: the HTTP client and the progress bar are only needed to download.
        from reconciler.core.errors import SettingsError
        from reconciler.models.download import new_client
        from reconciler.models.mirror_auth import load_mirror_auth
        from reconciler.models.progress import ProgressReporter

        settings = self._settings
        try:
            auth = load_mirror_auth(settings.mirror_auth_file)
        except SettingsError as exc:
            # As for registry_auth_file: the pass that needs it fails (and is retried),
            # the settings stay loadable.
            raise DownloadError(f"model downloads: {exc.one_line()}") from exc
        with new_client(auth=auth) as client:
            self._store.ensure(
                models,
                client=client,
                base_url=settings.normalised_origin(),
                concurrency=settings.download_concurrency,
                progress_reporter=ProgressReporter(),
                reserve_bytes=settings.disk_reserve_bytes,
                limits=DownloadLimits.of(settings),
            )

    def remove(self, model_id: str) -> None:
        self._store.remove(model_id)

    def gc(self, keep: set[str]) -> GcFreed:
        report = self._store.gc(keep)
        return GcFreed(removed_blobs=report.removed_blobs, freed_bytes=report.freed_bytes)

    def states(self, models: Sequence[ModelSpec]) -> list[dict[str, str | None]]:
        return [
            {"id": s.model_id, "state": s.state.value, "reason": s.reason}
            for s in self._store.states(models)
        ]

    def verify(self) -> list[str]:
        return [bad.one_line() for bad in self._store.verify_all(repair=True)]


@dataclass(frozen=True)
class HooksFolder:
    """``HookRunner`` over ``run_hook``: executables in one folder, one timeout for all."""

    folder: Path
    timeout_s: float
    group: str | None = None  # strict_modes_group: may write the hooks (disk.strict)

    def run(self, name: str, *, env: Mapping[str, str]) -> HookResult:
        return run_hook(self.folder, name, env=env, timeout_s=self.timeout_s, group=self.group)


def open_edge(node: Node) -> PodmanEdge:
    settings = node.settings
    return PodmanEdge(settings.effective_podman_url, registry_auth_file=settings.registry_auth_file)


class PodmanSession:
    """``RuntimeEdge`` over ``PodmanEdge``, connected on first use: a pass that stops before
    it observes (no HEAD, a quarantined or unverifiable HEAD) never contacts Podman."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._edge: PodmanEdge | None = None

    def _connected(self) -> PodmanEdge:
        if self._edge is None:
            self._edge = open_edge(self._node)
        return self._edge

    def observe(self) -> list[ObservedContainer]:
        return self._connected().observe()

    def apply(
        self,
        plan: ContainerPlan,
        desired: Sequence[ContainerSpec],
        /,
        *,
        allow_pull: bool,
        on_outcome: Callable[[ActionOutcome], None] | None,
    ) -> list[ActionOutcome]:
        return self._connected().apply(plan, desired, allow_pull=allow_pull, on_outcome=on_outcome)

    def close(self) -> None:
        if self._edge is not None:
            self._edge.close()
            self._edge = None


@contextlib.contextmanager
def production_edges(node: Node) -> Iterator[Edges]:
    """The real edges of ``node``, closed (Podman's connection) when the block ends."""
    session = PodmanSession(node)
    settings = node.settings
    try:
        yield Edges(
            models=StoreEdge(ModelStore(node.paths), settings=settings),
            runtime=session,
            hooks=HooksFolder(
                Path(settings.hooks_dir), settings.hook_timeout_s, settings.strict_modes_group
            ),
            clock=time.time,
            crash=die_at,
        )
    finally:
        session.close()
