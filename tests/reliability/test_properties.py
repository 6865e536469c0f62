"""Properties of the planner and of the defences in the pure core, over generated inputs.

The planner is checked against a small model of Podman written here: ``simulate`` carries
out a plan's actions on a set of ``ObservedContainer`` values the way the Podman edge does
(a replace ends with a new container under the old name, running; a create needs a free
name; a start needs a startable state; an action on an unknown or unmanaged container is a
failure) and refuses anything the real service would refuse. For any desired and observed
state:

* applying the plan to the observed state yields the desired one, leaving every container
  without the managed label exactly as it was;
* the plan of a converged node is empty, and planning again after applying is empty;
* every image a create or replace needs was pulled before the first change.

The parsers' own properties (any bytes → a verdict or one of the project's errors) are in
tests/test_properties.py; here are the two defences that keep a snapshot inside the node's
folders (docs/contract.md §2): container mounts and model file paths.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck as Health
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.containerplan import (
    STARTABLE_STATES,
    Action,
    ContainerPlan,
    ObservedContainer,
    plan_containers,
)
from reconciler.core.documents import HealthCheck, ModelFile, ModelSpec, PortMapping, RuntimeSpec
from reconciler.core.paths import NodePaths
from reconciler.core.schema import SchemaError, validate
from reconciler.core.specs import (
    LABEL_MANAGED,
    LABEL_RUNTIME,
    LABEL_SPEC,
    RUNTIME_MOUNT,
    ContainerSpec,
    UnsafeSpecError,
    container_name,
    container_specs,
)
from reconciler.models.store import ModelLayoutError, ModelStore
from tests.support.podman_fixtures import build_snapshot

DIGEST = "sha256:" + "c" * 64
IMAGES = tuple(f"registry.test/rt/{n}@sha256:{c * 64}" for n, c in zip("abc", "123", strict=True))
RUNTIME_NAMES = ("llm", "embed", "vision", "asr", "tts")
PODMAN_STATES = (
    "running",
    "exited",
    "created",
    "stopped",
    "configured",
    "initialized",
    "paused",
    "dead",
    "removing",
    "unknown",
)
PATHS = NodePaths(Path("/var/lib/reconciler"))
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[Health.too_slow])


class PodmanRefusedError(AssertionError):
    """What the real service would refuse (or what the edge would refuse to do)."""


@dataclass
class PodmanModel:
    """A container host reduced to what the plan can change: containers by id, local images."""

    containers: dict[str, ObservedContainer]
    images: set[str] = field(default_factory=set)
    changed: bool = False
    next_id: int = 0

    def by_name(self, name: str) -> ObservedContainer | None:
        return next((c for c in self.containers.values() if c.name == name), None)

    def managed(self, container_id: str | None) -> ObservedContainer:
        current = self.containers.get(container_id or "")
        if current is None:
            raise PodmanRefusedError(f"no container {container_id}")
        if not current.managed:
            raise PodmanRefusedError(f"the plan acts on unmanaged container {current.name}")
        return current

    def fresh(self, spec: ContainerSpec) -> ObservedContainer:
        if spec.image not in self.images:
            raise PodmanRefusedError(f"{spec.image} used before it was pulled")
        self.next_id += 1
        return ObservedContainer(
            id=f"new{self.next_id:04d}",
            name=spec.name,
            state="running",
            labels=spec.labels,
            image=spec.image,
        )


def simulate(
    observed: Sequence[ObservedContainer], result: ContainerPlan, desired: Sequence[ContainerSpec]
) -> PodmanModel:
    """Carry out ``result`` on ``observed`` as the Podman edge would, or raise."""
    host = PodmanModel({c.id: c for c in observed})
    specs = {spec.runtime: spec for spec in desired}
    for action in result.actions:
        _act(host, action, specs)
    return host


def _act(host: PodmanModel, action: Action, specs: dict[str, ContainerSpec]) -> None:
    if action.kind == "pull":
        if host.changed:
            raise PodmanRefusedError(f"pull of {action.image} after a change")
        assert action.image is not None
        host.images.add(action.image)
        return
    host.changed = True
    if action.kind == "remove":
        del host.containers[host.managed(action.container_id).id]
        return
    spec = specs.get(action.runtime)
    if spec is None or spec.name != action.container:
        raise PodmanRefusedError(f"{action.describe()} has no desired spec")
    if action.kind == "create":
        if host.by_name(spec.name) is not None:
            raise PodmanRefusedError(f"name {spec.name} is taken")
        new = host.fresh(spec)
        host.containers[new.id] = new
    elif action.kind == "replace":
        old = host.managed(action.container_id)
        if old.name != spec.name:
            raise PodmanRefusedError(f"replace of {old.name} under the name {spec.name}")
        del host.containers[old.id]
        new = host.fresh(spec)
        host.containers[new.id] = new
    elif action.kind == "start":
        current = host.managed(action.container_id)
        if current.state not in STARTABLE_STATES:
            raise PodmanRefusedError(f"cannot start a {current.state} container")
        host.containers[current.id] = ObservedContainer(
            id=current.id,
            name=current.name,
            state="running",
            labels=current.labels,
            image=current.image,
        )
    elif action.kind == "notify":
        if not host.managed(action.container_id).running:
            raise PodmanRefusedError("notify of a container that is not running")
    else:  # pragma: no cover - plan_containers() has no other kinds
        raise PodmanRefusedError(f"unknown action {action.kind}")


# ---- generated states ---------------------------------------------------------------------


@st.composite
def container_spec(draw: st.DrawFn, runtime: str) -> ContainerSpec:
    ports = draw(st.booleans())
    update = "stop-first" if ports else draw(st.sampled_from(["stop-first", "start-first"]))
    health = draw(st.none() | st.just(HealthCheck(command=("true",))))
    return ContainerSpec(
        name=container_name(runtime),
        runtime=runtime,
        image=draw(st.sampled_from(IMAGES)),
        command=draw(st.none() | st.just(("serve",))),
        env=tuple(
            sorted(draw(st.dictionaries(st.sampled_from("AB"), st.sampled_from("01"))).items())
        ),
        mounts=(),
        devices=(),
        ports=(PortMapping(8080, 18000 + RUNTIME_NAMES.index(runtime)),) if ports else (),
        network="reconciler" if ports else None,
        restart_policy="on-failure",
        restart_retries=3,
        health=health,
        update=update,  # type: ignore[arg-type]
        notify=draw(st.sampled_from(["restart", "signal:HUP"])),
        config_digest=DIGEST,
    )


@st.composite
def desired_specs(draw: st.DrawFn) -> list[ContainerSpec]:
    runtimes = draw(st.lists(st.sampled_from(RUNTIME_NAMES), unique=True, max_size=4))
    return [draw(container_spec(r)) for r in runtimes]


@st.composite
def observed_containers(
    draw: st.DrawFn, desired: Sequence[ContainerSpec]
) -> list[ObservedContainer]:
    """What a node may show: desired names in any state and with any label, leftovers of
    interrupted replaces, dropped runtimes, foreign containers with similar names."""
    candidates = [s.name for s in desired] + [container_name(r) for r in RUNTIME_NAMES]
    candidates += [name + "-NEXT" for name in candidates] + ["reconciler-x", "other"]
    names = draw(st.lists(st.sampled_from(sorted(set(candidates))), unique=True, max_size=7))
    by_name = {s.name: s for s in desired}
    containers = []
    for number, name in enumerate(names):
        managed = draw(st.integers(0, 9)) > 0  # mostly ours, sometimes someone else's
        labels: dict[str, str] = {}
        if managed:
            labels[LABEL_MANAGED] = "true"
            labels[LABEL_RUNTIME] = name.removeprefix("reconciler-").removesuffix("-NEXT")
            wanted = by_name.get(name)
            same = wanted is not None and draw(st.booleans())
            labels[LABEL_SPEC] = wanted.spec_hash if same and wanted else "0" * 64
        elif draw(st.booleans()):
            labels[LABEL_MANAGED] = "false"
        containers.append(
            ObservedContainer(
                id=f"old{number:04d}",
                name=name,
                state=draw(st.sampled_from(PODMAN_STATES)),
                labels=labels,
                image=draw(st.sampled_from(IMAGES)),
            )
        )
    return containers


@st.composite
def desired_and_observed(
    draw: st.DrawFn,
) -> tuple[list[ContainerSpec], list[ObservedContainer], frozenset[str]]:
    desired = draw(desired_specs())
    observed = draw(observed_containers(desired))
    notify = frozenset(draw(st.lists(st.sampled_from([s.runtime for s in desired] or ["llm"]))))
    return desired, observed, notify


def converged_view(specs: Sequence[ContainerSpec]) -> list[ObservedContainer]:
    return [
        ObservedContainer(
            id=f"id-{s.name}", name=s.name, state="running", labels=s.labels, image=s.image
        )
        for s in specs
    ]


# ---- the planner --------------------------------------------------------------------------


@FAST
@given(desired_and_observed())
def test_applying_the_plan_to_any_observed_state_yields_the_desired_state(
    case: tuple[list[ContainerSpec], list[ObservedContainer], frozenset[str]],
) -> None:
    desired, observed, notify = case
    result = plan_containers(desired, observed, notify_runtimes=notify)
    host = simulate(observed, result, desired)

    blocked = {c.container for c in result.conflicts}
    after = {c.name: c for c in host.containers.values()}
    for spec in desired:
        current = after.get(spec.name)
        assert current is not None, f"{spec.name} is missing after the plan"
        if spec.name in blocked:
            assert not current.managed  # the foreign container was left where it was
            continue
        assert current.managed and current.running
        assert current.spec_hash == spec.spec_hash
    wanted = {s.name for s in desired}
    assert all(c.name in wanted for c in host.containers.values() if c.managed)
    # Containers without the managed label are exactly as they were.
    foreign_before = {c.id: c for c in observed if not c.managed}
    foreign_after = {c.id: c for c in host.containers.values() if not c.managed}
    assert foreign_after == foreign_before


@FAST
@given(desired_and_observed())
def test_planning_again_after_applying_the_plan_finds_nothing_to_do(
    case: tuple[list[ContainerSpec], list[ObservedContainer], frozenset[str]],
) -> None:
    desired, observed, notify = case
    first = plan_containers(desired, observed, notify_runtimes=notify)
    host = simulate(observed, first, desired)
    second = plan_containers(desired, list(host.containers.values()))
    assert second.actions == ()
    assert second.conflicts == first.conflicts


@FAST
@given(desired_specs())
def test_the_plan_of_a_converged_node_is_empty(desired: list[ContainerSpec]) -> None:
    assert plan_containers(desired, converged_view(desired)).empty


@FAST
@given(desired_and_observed())
def test_a_plan_touches_nothing_when_it_can_only_fail_at_a_pull(
    case: tuple[list[ContainerSpec], list[ObservedContainer], frozenset[str]],
) -> None:
    """Every pull precedes every change, so a registry outage stops a pass before it acts."""
    desired, observed, notify = case
    kinds = [a.kind for a in plan_containers(desired, observed, notify_runtimes=notify).actions]
    if "pull" in kinds:
        last_pull = len(kinds) - 1 - kinds[::-1].index("pull")
        assert all(k == "pull" for k in kinds[: last_pull + 1])


def test_simulator_refuses_what_podman_would_refuse() -> None:
    """The model above must be able to fail, or the properties prove nothing."""
    spec = ContainerSpec(
        name="reconciler-llm",
        runtime="llm",
        image=IMAGES[0],
        command=None,
        env=(),
        mounts=(),
        devices=(),
        ports=(),
        network=None,
        restart_policy="on-failure",
        restart_retries=3,
        health=None,
        update="stop-first",
        notify="restart",
        config_digest=DIGEST,
    )
    taken = [ObservedContainer(id="x", name="reconciler-llm", state="running")]
    create = Action(kind="create", runtime="llm", container="reconciler-llm", reason="t")
    pull = Action(
        kind="pull", runtime="llm", container="reconciler-llm", reason="t", image=spec.image
    )
    with pytest.raises(PodmanRefusedError, match="taken"):
        simulate(taken, ContainerPlan(actions=(pull, create)), [spec])
    with pytest.raises(PodmanRefusedError, match="before it was pulled"):
        simulate([], ContainerPlan(actions=(create,)), [spec])
    remove_foreign = Action(
        kind="remove", runtime="", container="reconciler-llm", reason="t", container_id="x"
    )
    with pytest.raises(PodmanRefusedError, match="unmanaged"):
        simulate(taken, ContainerPlan(actions=(remove_foreign,)), [spec])


# ---- defences that keep a snapshot inside the node's folders -------------------------------

_PATH_PIECES = ("a", "b", ".", "..", "/", "\\", "-", "_", "~", " ", "\0", ":", "%2e", "C:")
_path_text = st.lists(st.sampled_from(_PATH_PIECES), max_size=12).map("".join)
_mount_text = st.one_of(
    st.sampled_from(["/models", "/", "/run", "/run/reconciler", "/etc", "/models/../etc", "x"]),
    st.builds(lambda s: "/" + s, _path_text),
)


@st.composite
def hostile_runtime(draw: st.DrawFn) -> RuntimeSpec:
    model_ids = draw(
        st.lists(
            st.sampled_from(["tiny:v1", "../x:v1", "tiny:../..", "a/b:v1", "tiny:v1/..", ".:."])
            | st.builds(lambda a, b: f"{a}:{b}", _path_text, _path_text),
            max_size=3,
            unique=True,
        )
    )
    return RuntimeSpec(
        name=draw(st.sampled_from(["llm", "../llm", "llm/x", ".", "LLM"])),
        image=draw(st.sampled_from([IMAGES[0], "registry.test/rt/a:latest", "a@sha256:short"])),
        models=tuple(model_ids),
        model_mount=draw(_mount_text),
        devices=tuple(
            draw(st.lists(st.sampled_from(["nvidia.com/gpu=all", "/dev/sda"]), max_size=2))
        ),
    )


@FAST
@given(hostile_runtime())
def test_no_runtime_definition_mounts_a_host_path_outside_models_and_runtime(
    runtime: RuntimeSpec,
) -> None:
    snapshot = build_snapshot(schema=False)
    snapshot = type(snapshot)(**{**snapshot.__dict__, "runtimes": (runtime,)})
    try:
        specs = container_specs(snapshot, config_digest=DIGEST, paths=PATHS)
    except UnsafeSpecError:
        return
    roots = (str(PATHS.models), str(PATHS.runtime))
    for spec in specs:
        assert spec.image.count("@sha256:") == 1 and len(spec.image.rsplit(":", 1)[1]) == 64
        assert all(d == "nvidia.com/gpu=all" for d in spec.devices)
        for mount in spec.mounts:
            source = posixpath.normpath(mount.source)
            assert source == mount.source
            assert any(source == r or source.startswith(r + "/") for r in roots), source
            if mount.target != RUNTIME_MOUNT:
                assert not mount.target.startswith(RUNTIME_MOUNT + "/")


@FAST
@given(path=_path_text)
def test_no_model_file_path_is_laid_out_outside_its_tree(path: str) -> None:
    """Whatever the schema lets through, the store still refuses to leave the tree."""
    try:
        validate("snapshot", _snapshot_with_file_path(path))
        schema_ok = True
    except SchemaError:
        schema_ok = False
    model = ModelSpec(
        name="tiny",
        version="v1",
        files=(ModelFile(path=path, size=1, digest=DIGEST, urls=("x",)),),
    )
    # Offline and with no blob on disk, ensure() only checks the layout and writes nothing.
    store = ModelStore(NodePaths(Path("/nonexistent/reconciler")))
    try:
        store.ensure([model], client=None, base_url=None)
        store_ok = True
    except ModelLayoutError:
        store_ok = False
    if schema_ok or store_ok:
        tree = "/var/lib/reconciler/models/tiny/v1"
        laid_out = posixpath.normpath(posixpath.join(tree, path))
        assert laid_out.startswith(tree + "/"), (path, schema_ok, store_ok)
    if schema_ok:
        assert store_ok, f"the schema accepts {path!r} but the store refuses it"


def _snapshot_with_file_path(path: str) -> dict[str, object]:
    from tests.support.podman_fixtures import snapshot_payload

    body = snapshot_payload(models=[("tiny", "v1")])
    body["models"][0]["files"][0]["path"] = path  # type: ignore[index]
    return body


# ---- the node settings parser ----------------------------------------------------------------

_settings_line = st.one_of(
    st.sampled_from(
        [
            'origin = "http://127.0.0.1:1/"',
            'network = "testnet"',
            "keep_applied = 2",
            "keep_applied = -1",
            'keep_applied = "two"',
            "download_concurrency = 0",
            "hook_timeout_s = 1.5",
            "vram_mib = 24576",
            'opt_out_subclouds = ["eu-small"]',
            "opt_out_subclouds = [1, 2]",
            'log_format = "xml"',
            "fetch_timeout_s = 0",
            "unknown_key = 1",
            "[table]",
            "keep_applied = [oops",
            'origin = "unterminated',
            "= 3",
        ]
    ),
    st.text(max_size=30),
)


@FAST
@given(st.lists(_settings_line, max_size=6))
def test_any_settings_file_gives_settings_or_one_line_naming_the_problem(
    lines: list[str],
) -> None:
    import tempfile

    from reconciler.config.settings import Settings, load_settings
    from reconciler.core.errors import SettingsError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            settings = load_settings(config=str(path), environ={})
        except SettingsError as exc:
            message = exc.one_line()
            assert message and "\n" not in message
            assert exc.exit_code == 2
            return
    assert isinstance(settings, Settings)
