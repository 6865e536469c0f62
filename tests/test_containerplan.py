"""plan_containers: desired specs + observed containers → ordered actions (pure, no Podman)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.containerplan import Action, ContainerPlan, ObservedContainer, plan_containers
from reconciler.core.paths import NodePaths
from reconciler.core.specs import (
    LABEL_CONFIG_DIGEST,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    LABEL_SPEC,
    ContainerSpec,
    container_specs,
)
from tests.support.podman_fixtures import build_snapshot

IMAGE_A = "registry.example/rt/a@sha256:" + "a" * 64
IMAGE_B = "registry.example/rt/b@sha256:" + "b" * 64
DIGEST = "sha256:" + "1" * 64


def spec(name: str, *, image: str = IMAGE_A, **fields: Any) -> ContainerSpec:
    snapshot = build_snapshot(runtimes=[{"name": name, "image": image, **fields}])
    (only,) = container_specs(
        snapshot, config_digest=DIGEST, paths=NodePaths(Path("/var/lib/reconciler"))
    )
    return only


def seen(
    name: str,
    *,
    state: str = "running",
    spec_of: ContainerSpec | None = None,
    spec_hash: str | None = None,
    managed: bool = True,
    labels: dict[str, str] | None = None,
) -> ObservedContainer:
    """An observed container; managed ones carry the labels the given spec would give them."""
    found: dict[str, str] = {}
    if managed:
        found = {LABEL_MANAGED: "true", LABEL_RUNTIME: name.removeprefix("reconciler-")}
        if spec_of is not None:
            found = dict(spec_of.labels)
        if spec_hash is not None:
            found[LABEL_SPEC] = spec_hash
    found.update(labels or {})
    return ObservedContainer(id=f"id-{name}", name=name, state=state, labels=found)


A = spec("a")
A_NEW_IMAGE = spec("a", image=IMAGE_B)
A_START_FIRST = spec("a", image=IMAGE_B, update="start-first")
A_SIGNAL = spec("a", notify="signal:HUP")
B = spec("b", image=IMAGE_B)


def kinds(result: ContainerPlan) -> list[tuple[str, str]]:
    return [(action.kind, action.container) for action in result.actions]


CASES: list[
    tuple[str, list[ContainerSpec], list[ObservedContainer], frozenset[str], list[tuple[str, str]]]
] = [
    ("nothing-anywhere", [], [], frozenset(), []),
    ("converged", [A], [seen("reconciler-a", spec_of=A)], frozenset(), []),
    (
        "missing-is-pulled-then-created",
        [A],
        [],
        frozenset(),
        [("pull", "reconciler-a"), ("create", "reconciler-a")],
    ),
    *[
        (
            f"{state}-is-started",
            [A],
            [seen("reconciler-a", spec_of=A, state=state)],
            frozenset(),
            [("start", "reconciler-a")],
        )
        for state in ("exited", "stopped", "created", "configured", "initialized")
    ],
    *[
        (
            f"{state}-is-recreated",
            [A],
            [seen("reconciler-a", spec_of=A, state=state)],
            frozenset(),
            [("pull", "reconciler-a"), ("replace", "reconciler-a")],
        )
        for state in ("paused", "dead", "removing", "unknown")
    ],
    (
        "spec-label-differs-is-replaced",
        [A_NEW_IMAGE],
        [seen("reconciler-a", spec_of=A)],
        frozenset(),
        [("pull", "reconciler-a"), ("replace", "reconciler-a")],
    ),
    (
        "spec-label-missing-is-replaced",
        [A],
        [seen("reconciler-a")],
        frozenset(),
        [("pull", "reconciler-a"), ("replace", "reconciler-a")],
    ),
    (
        "stopped-with-changed-spec-is-replaced-not-started",
        [A_NEW_IMAGE],
        [seen("reconciler-a", spec_of=A, state="exited")],
        frozenset(),
        [("pull", "reconciler-a"), ("replace", "reconciler-a")],
    ),
    (
        "undesired-managed-is-removed",
        [],
        [seen("reconciler-old", spec_of=spec("old"))],
        frozenset(),
        [("remove", "reconciler-old")],
    ),
    (
        "undesired-stopped-managed-is-removed",
        [],
        [seen("reconciler-old", spec_of=spec("old"), state="exited")],
        frozenset(),
        [("remove", "reconciler-old")],
    ),
    (
        "leftover-start-first-temporary-is-removed",
        [A],
        [seen("reconciler-a", spec_of=A), seen("reconciler-a-NEXT", spec_of=A)],
        frozenset(),
        [("remove", "reconciler-a-NEXT")],
    ),
    (
        "unmanaged-is-never-touched",
        [],
        [seen("reconciler-x", managed=False), seen("web", managed=False)],
        frozenset(),
        [],
    ),
    (
        "managed-label-other-than-true-is-unmanaged",
        [],
        [seen("reconciler-x", managed=False, labels={LABEL_MANAGED: "false"})],
        frozenset(),
        [],
    ),
    (
        "unmanaged-with-similar-name-is-not-touched",
        [A],
        [seen("reconciler-a", spec_of=A), seen("reconciler-a2", managed=False)],
        frozenset(),
        [],
    ),
    (
        "jobs-changed-running-is-notified",
        [A],
        [seen("reconciler-a", spec_of=A)],
        frozenset({"a"}),
        [("notify", "reconciler-a")],
    ),
    (
        "jobs-changed-but-replaced-is-not-notified",
        [A_NEW_IMAGE],
        [seen("reconciler-a", spec_of=A)],
        frozenset({"a"}),
        [("pull", "reconciler-a"), ("replace", "reconciler-a")],
    ),
    (
        "jobs-changed-but-created-is-not-notified",
        [A],
        [],
        frozenset({"a"}),
        [("pull", "reconciler-a"), ("create", "reconciler-a")],
    ),
    (
        "jobs-changed-but-started-is-not-notified",
        [A],
        [seen("reconciler-a", spec_of=A, state="exited")],
        frozenset({"a"}),
        [("start", "reconciler-a")],
    ),
    (
        "notify-for-undesired-runtime-is-ignored",
        [],
        [],
        frozenset({"gone"}),
        [],
    ),
    (
        "config-digest-label-alone-changes-nothing",
        [A],
        [seen("reconciler-a", spec_of=A, labels={LABEL_CONFIG_DIGEST: "sha256:" + "9" * 64})],
        frozenset(),
        [],
    ),
    (
        "every-kind-in-safe-order",
        [A_NEW_IMAGE, B, spec("c"), spec("d")],
        [
            seen("reconciler-a", spec_of=A),
            seen("reconciler-c", spec_of=spec("c"), state="exited"),
            seen("reconciler-d", spec_of=spec("d")),
            seen("reconciler-old", spec_of=spec("old")),
        ],
        frozenset({"d"}),
        [
            ("pull", "reconciler-a"),
            ("pull", "reconciler-b"),
            ("remove", "reconciler-old"),
            ("replace", "reconciler-a"),
            ("create", "reconciler-b"),
            ("start", "reconciler-c"),
            ("notify", "reconciler-d"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("desired", "observed", "notify", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_table(
    desired: list[ContainerSpec],
    observed: list[ObservedContainer],
    notify: frozenset[str],
    expected: list[tuple[str, str]],
) -> None:
    result = plan_containers(desired, observed, notify_runtimes=notify)
    assert kinds(result) == expected
    assert result.empty == (not expected)
    assert result.conflicts == ()


def test_plan_does_not_depend_on_input_order() -> None:
    desired = [B, A_NEW_IMAGE, spec("c")]
    observed = [seen("reconciler-old", spec_of=spec("old")), seen("reconciler-a", spec_of=A)]
    forward = plan_containers(desired, observed)
    backward = plan_containers(desired[::-1], observed[::-1])
    assert forward == backward


def test_all_pulls_come_before_any_change() -> None:
    desired = [spec(f"r{i}", image=IMAGE_B) for i in range(5)]
    observed = [seen(f"reconciler-r{i}", spec_of=spec(f"r{i}")) for i in range(0, 5, 2)]
    observed.append(seen("reconciler-gone", spec_of=spec("gone")))
    result = plan_containers(desired, observed)
    kinds_only = [a.kind for a in result.actions]
    last_pull = max(i for i, kind in enumerate(kinds_only) if kind == "pull")
    first_change = min(i for i, kind in enumerate(kinds_only) if kind != "pull")
    assert last_pull < first_change


@pytest.mark.parametrize(
    ("desired_spec", "expected_strategy"),
    [(A_NEW_IMAGE, "stop-first"), (A_START_FIRST, "start-first")],
    ids=["stop-first", "start-first"],
)
def test_replace_carries_the_runtimes_update_strategy(
    desired_spec: ContainerSpec, expected_strategy: str
) -> None:
    (_, replace) = plan_containers([desired_spec], [seen("reconciler-a", spec_of=A)]).actions
    assert replace.strategy == expected_strategy
    assert replace.container_id == "id-reconciler-a"
    assert replace.image == desired_spec.image


def test_recreating_a_paused_container_stops_it_first_whatever_the_strategy() -> None:
    start_first = spec("a", update="start-first")
    observed = [seen("reconciler-a", spec_of=start_first, state="paused")]
    (_, replace) = plan_containers([start_first], observed).actions
    assert replace.strategy == "stop-first"


@pytest.mark.parametrize(
    ("desired_spec", "how"),
    [(A, "restart"), (A_SIGNAL, "signal:HUP")],
    ids=["restart", "signal"],
)
def test_notify_uses_the_runtimes_notify_setting(desired_spec: ContainerSpec, how: str) -> None:
    observed = [seen("reconciler-a", spec_of=desired_spec)]
    (action,) = plan_containers([desired_spec], observed, notify_runtimes=frozenset({"a"})).actions
    assert (action.kind, action.notify, action.container_id) == ("notify", how, "id-reconciler-a")


def test_pull_and_create_name_the_pinned_image() -> None:
    pull, create = plan_containers([B], []).actions
    assert pull.image == create.image == IMAGE_B
    assert (pull.runtime, create.runtime) == ("b", "b")


def test_remove_names_the_runtime_from_its_label() -> None:
    (remove,) = plan_containers([], [seen("reconciler-old", spec_of=spec("old"))]).actions
    assert (remove.runtime, remove.container_id) == ("old", "id-reconciler-old")


def test_unmanaged_container_holding_a_desired_name_is_a_conflict_not_an_action() -> None:
    observed = [
        seen("reconciler-a", managed=False),
        seen("reconciler-b", spec_of=B, state="exited"),
    ]
    result = plan_containers([A, B], observed)
    assert kinds(result) == [("start", "reconciler-b")]
    (conflict,) = result.conflicts
    assert (conflict.runtime, conflict.container, conflict.container_id) == (
        "a",
        "reconciler-a",
        "id-reconciler-a",
    )
    assert not result.empty
    assert "without the managed label" in result.describe()[-1]


def test_no_action_ever_targets_an_unmanaged_container() -> None:
    unmanaged = [seen(n, managed=False) for n in ("reconciler-a", "reconciler-zz", "db")]
    result = plan_containers([A, B], unmanaged, notify_runtimes=frozenset({"a", "b"}))
    ids = {action.container_id for action in result.actions}
    assert ids.isdisjoint({c.id for c in unmanaged})


def test_rejects_two_desired_containers_with_one_name() -> None:
    with pytest.raises(ValueError, match="share a name"):
        plan_containers([A, A_NEW_IMAGE], [])


@pytest.mark.parametrize(
    ("action", "line"),
    [
        (
            Action("pull", "a", "reconciler-a", "image needed", image=IMAGE_A),
            f"pull {IMAGE_A} for reconciler-a (runtime a)",
        ),
        (
            Action("create", "a", "reconciler-a", "missing"),
            "create reconciler-a (runtime a): missing",
        ),
        (
            Action("replace", "a", "reconciler-a", "spec changed", strategy="start-first"),
            "replace reconciler-a (runtime a) start-first: spec changed",
        ),
        (Action("start", "a", "reconciler-a", "exited"), "start reconciler-a (runtime a): exited"),
        (Action("remove", "", "reconciler-x", "not desired"), "remove reconciler-x: not desired"),
        (
            Action("notify", "a", "reconciler-a", "jobs changed", notify="signal:HUP"),
            "notify reconciler-a (runtime a) by signal:HUP: jobs changed",
        ),
    ],
    ids=["pull", "create", "replace", "start", "remove", "notify"],
)
def test_describe_is_one_line(action: Action, line: str) -> None:
    assert action.describe() == line


def test_plan_json_round_trips_through_json() -> None:
    observed = [seen("reconciler-a", spec_of=A), seen("reconciler-z", managed=False)]
    result = plan_containers([A_NEW_IMAGE, spec("z")], observed)
    encoded = json.loads(json.dumps(result.to_json()))
    assert encoded["empty"] is False
    assert [a["kind"] for a in encoded["actions"]] == ["pull", "replace"]
    assert encoded["actions"][1]["strategy"] == "stop-first"
    assert encoded["conflicts"] == [
        {"runtime": "z", "container": "reconciler-z", "id": "id-reconciler-z"}
    ]


def test_observed_labels_cannot_be_changed_through_the_callers_dict() -> None:
    labels = {LABEL_MANAGED: "true"}
    container = ObservedContainer(id="x", name="reconciler-x", state="running", labels=labels)
    labels[LABEL_MANAGED] = "false"
    assert container.managed
    with pytest.raises(TypeError):
        container.labels[LABEL_MANAGED] = "false"  # type: ignore[index]
