"""core.specs.container_specs: snapshot runtimes → container specs (pure, no Podman)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.documents import PortMapping, RuntimeSpec
from reconciler.core.errors import SettingsError, SnapshotFaultError
from reconciler.core.paths import NodePaths
from reconciler.core.specs import (
    LABEL_CONFIG_DIGEST,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    LABEL_SPEC,
    NETWORK_NAME,
    RUNTIME_MOUNT,
    BindMount,
    ContainerSpec,
    UnsafeSpecError,
    container_specs,
)
from tests.support.podman_fixtures import build_snapshot

IMAGE = "registry.example/rt/llm@sha256:" + "a" * 64
OTHER_IMAGE = "registry.example/rt/llm@sha256:" + "b" * 64
DIGEST = "sha256:" + "1" * 64
OTHER_DIGEST = "sha256:" + "2" * 64
PATHS = NodePaths(Path("/var/lib/reconciler"))
MODELS = [("mistral", "v1"), ("phi", "v2")]


def runtime(**fields: Any) -> dict[str, Any]:
    return {"name": "llm", "image": IMAGE, **fields}


def one_spec(*, paths: NodePaths = PATHS, digest: str = DIGEST, **fields: Any) -> ContainerSpec:
    snapshot = build_snapshot(runtimes=[runtime(**fields)], models=MODELS)
    (spec,) = container_specs(snapshot, config_digest=digest, paths=paths)
    return spec


def unchecked_spec(**fields: Any) -> ContainerSpec:
    """A spec from a runtime the schema would reject: the defence-in-depth path."""
    snapshot = build_snapshot(runtimes=[], models=MODELS)
    definition = RuntimeSpec(**{"name": "llm", "image": IMAGE, **fields})
    bad = dataclasses.replace(snapshot, runtimes=(definition,))
    (spec,) = container_specs(bad, config_digest=DIGEST, paths=PATHS)
    return spec


def test_names_container_after_runtime_and_pins_image() -> None:
    spec = one_spec()
    assert spec.name == "reconciler-llm"
    assert spec.runtime == "llm"
    assert spec.image == IMAGE


def test_labels_mark_container_managed_with_spec_digest_and_runtime() -> None:
    spec = one_spec()
    assert spec.labels == {
        LABEL_MANAGED: "true",
        LABEL_SPEC: spec.spec_hash,
        LABEL_CONFIG_DIGEST: DIGEST,
        LABEL_RUNTIME: "llm",
    }
    assert re.fullmatch(r"[0-9a-f]{64}", spec.spec_hash)


def test_mounts_each_model_read_only_under_model_mount_and_runtime_folder() -> None:
    spec = one_spec(models=["mistral:v1", "phi:v2"], model_mount="/weights")
    assert spec.mounts == (
        BindMount("/var/lib/reconciler/models/mistral/v1", "/weights/mistral/v1"),
        BindMount("/var/lib/reconciler/models/phi/v2", "/weights/phi/v2"),
        BindMount("/var/lib/reconciler/runtime", RUNTIME_MOUNT),
    )
    assert all(m["ro"] for m in spec.definition()["mounts"])


def test_model_mount_defaults_to_models() -> None:
    spec = one_spec(models=["mistral:v1"])
    assert spec.mounts[0].target == "/models/mistral/v1"


def test_every_container_gets_the_runtime_folder_even_without_models() -> None:
    assert one_spec().mounts == (BindMount("/var/lib/reconciler/runtime", "/run/reconciler"),)


@pytest.mark.parametrize(
    ("ports", "network", "published"),
    [
        ([], None, ()),
        (
            [{"container": 8080, "host": 18080}],
            NETWORK_NAME,
            (PortMapping(container=8080, host=18080),),
        ),
        (
            [{"container": 53, "host": 5353, "protocol": "udp"}],
            NETWORK_NAME,
            (PortMapping(container=53, host=5353, protocol="udp"),),
        ),
    ],
    ids=["no-ports-no-network", "tcp-port-joins-bridge", "udp-port"],
)
def test_network_only_when_ports_are_given(
    ports: list[dict[str, Any]], network: str | None, published: tuple[PortMapping, ...]
) -> None:
    fields: dict[str, Any] = {"ports": ports} if ports else {}
    spec = one_spec(**fields)
    assert spec.network == network
    assert spec.ports == published
    assert all(p["host_ip"] == "127.0.0.1" for p in spec.definition()["ports"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {},
            {
                "command": None,
                "env": (),
                "devices": (),
                "update": "stop-first",
                "notify": "restart",
            },
        ),
        ({"command": ["serve", "--x"]}, {"command": ("serve", "--x")}),
        ({"env": {"B": "2", "A": "1"}}, {"env": (("A", "1"), ("B", "2"))}),
        ({"devices": ["nvidia.com/gpu=all"]}, {"devices": ("nvidia.com/gpu=all",)}),
        ({"update": "start-first"}, {"update": "start-first"}),
        ({"notify": "signal:HUP"}, {"notify": "signal:HUP"}),
    ],
    ids=["defaults", "command", "env-sorted", "cdi-device", "start-first", "notify-signal"],
)
def test_copies_runtime_fields(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    spec = one_spec(**fields)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


def test_health_check_is_carried_with_defaults() -> None:
    spec = one_spec(health={"command": ["wget", "-q", "localhost:8080"], "interval_s": 1})
    assert spec.health is not None
    assert spec.health.command == ("wget", "-q", "localhost:8080")
    assert (spec.health.interval_s, spec.health.retries) == (1, 15)


def test_specs_are_sorted_by_runtime_name() -> None:
    snapshot = build_snapshot(runtimes=[runtime(name="zeta"), runtime(name="alpha")])
    specs = container_specs(snapshot, config_digest=DIGEST, paths=PATHS)
    assert [s.name for s in specs] == ["reconciler-alpha", "reconciler-zeta"]


def test_no_runtimes_gives_no_specs() -> None:
    assert container_specs(build_snapshot(), config_digest=DIGEST, paths=PATHS) == []


# --- the spec hash -----------------------------------------------------------------------------

BASE: dict[str, Any] = {"models": ["mistral:v1"], "health": {"command": ["true"]}}


@pytest.mark.parametrize(
    "change",
    [
        {"image": OTHER_IMAGE},
        {"command": ["other"]},
        {"env": {"A": "1"}},
        {"models": ["mistral:v1", "phi:v2"]},
        {"models": ["phi:v2"]},
        {"model_mount": "/weights"},
        {"devices": ["nvidia.com/gpu=0"]},
        {"ports": [{"container": 80, "host": 8080}]},
        {"health": {"command": ["false"]}},
        {"health": {"command": ["true"], "retries": 3}},
        {"health": None},
        {"update": "start-first"},
        {"notify": "signal:USR1"},
    ],
    ids=lambda change: ",".join(change),
)
def test_spec_hash_changes_with_any_part_of_the_definition(change: dict[str, Any]) -> None:
    fields = {**BASE, **change}
    fields = {key: value for key, value in fields.items() if value is not None}
    assert one_spec(**fields).spec_hash != one_spec(**BASE).spec_hash


def test_spec_hash_changes_with_the_state_folder() -> None:
    moved = NodePaths(Path("/srv/reconciler"))
    assert one_spec(paths=moved, **BASE).spec_hash != one_spec(**BASE).spec_hash


def test_spec_hash_ignores_config_digest_and_jobs() -> None:
    first = build_snapshot(runtimes=[runtime(**BASE)], models=MODELS, jobs=None)
    second = build_snapshot(
        runtimes=[runtime(**BASE)],
        models=MODELS,
        jobs={"max_tokens": 9, "max_queue": 9, "timeout_s": 9},
        serial=2,
    )
    (a,) = container_specs(first, config_digest=DIGEST, paths=PATHS)
    (b,) = container_specs(second, config_digest=OTHER_DIGEST, paths=PATHS)
    assert a.spec_hash == b.spec_hash
    assert a.labels[LABEL_CONFIG_DIGEST] != b.labels[LABEL_CONFIG_DIGEST]


def test_spec_hash_does_not_depend_on_env_order() -> None:
    a = one_spec(env={"A": "1", "B": "2"})
    b = one_spec(env={"B": "2", "A": "1"})
    assert a.spec_hash == b.spec_hash


def test_spec_hash_is_stable_for_equal_input() -> None:
    assert one_spec(**BASE).spec_hash == one_spec(**BASE).spec_hash


# --- defence in depth: what the schema forbids is refused again --------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": ("/dev/sda",)}, "not a CDI device name"),
        ({"devices": ("/dev/nvidia0:/dev/nvidia0:rwm",)}, "not a CDI device name"),
        ({"image": "registry.example/rt/llm:latest"}, "not pinned"),
        ({"model_mount": "relative"}, "model_mount"),
        ({"model_mount": "/models/../etc"}, "model_mount"),
        ({"model_mount": "/"}, "model_mount"),
        ({"models": ("../../etc:x",)}, "name:version"),
        ({"models": ("mistral:../../..",)}, "name:version"),
        ({"models": ("mistral/v1",)}, "name:version"),
        ({"model_mount": "/run/reconciler/models", "models": ("mistral:v1",)}, "inside"),
        ({"model_mount": "/run", "models": ("reconciler:v1",)}, "inside"),
        ({"notify": "signal:KILL"}, "notify"),
        ({"update": "start-first", "ports": (PortMapping(80, 8080),)}, "start-first"),
        ({"ports": (PortMapping(80, 0),)}, "out of range"),
        ({"ports": (PortMapping(80, 8080, "sctp"),)}, "protocol"),
    ],
    ids=[
        "host-device-path",
        "host-device-mapping",
        "unpinned-image",
        "relative-model-mount",
        "dotdot-model-mount",
        "root-model-mount",
        "dotdot-model-name",
        "dotdot-model-version",
        "not-a-model-id",
        "mount-under-runtime-folder",
        "mount-over-runtime-folder",
        "unknown-signal",
        "start-first-with-ports",
        "host-port-zero",
        "unknown-protocol",
    ],
)
def test_refuses_what_no_runtime_may_have(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsafeSpecError, match=message) as caught:
        unchecked_spec(**fields)
    assert isinstance(caught.value, SnapshotFaultError)
    assert "runtime llm" in str(caught.value)


def test_refuses_a_runtime_name_that_is_not_one_path_component() -> None:
    snapshot = build_snapshot(runtimes=[], models=MODELS)
    bad = dataclasses.replace(snapshot, runtimes=(RuntimeSpec(name="../x", image=IMAGE),))
    with pytest.raises(UnsafeSpecError, match="valid runtime name"):
        container_specs(bad, config_digest=DIGEST, paths=PATHS)


def test_spec_has_no_field_for_privilege_namespaces_or_writable_mounts() -> None:
    fields = {f.name for f in dataclasses.fields(ContainerSpec)} | {
        f.name for f in dataclasses.fields(BindMount)
    }
    for forbidden in ("privileged", "pid", "ipc", "userns", "network_mode", "read_only", "rw"):
        assert forbidden not in fields


def test_requires_an_absolute_state_folder() -> None:
    with pytest.raises(SettingsError, match="absolute"):
        one_spec(paths=NodePaths(Path("relative/state")))


@pytest.mark.parametrize("digest", ["", "sha256:ABC", "md5:" + "1" * 64, "sha256:" + "1" * 63])
def test_rejects_malformed_config_digest(digest: str) -> None:
    with pytest.raises(ValueError, match="config digest"):
        one_spec(digest=digest)
