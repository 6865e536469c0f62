"""PodmanEdge against a real Podman service: converge, drift repair, failures, error mapping.

Each test converges a node folder (models + runtime/jobs.json) to small snapshots built from the
busybox test images, through observe → plan → apply, and checks the result from outside with
the podman CLI or a second edge.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.containerplan import ContainerPlan, plan_containers
from reconciler.core.errors import (
    ContainerError,
    PodmanUnavailableError,
    ReconcilerError,
    RegistryError,
    SnapshotFaultError,
)
from reconciler.core.paths import NodePaths
from reconciler.core.specs import (
    LABEL_CONFIG_DIGEST,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    LABEL_SPEC,
    container_specs,
)
from reconciler.runtime.podman import ActionOutcome, PodmanEdge
from tests.support.podman_fixtures import PodmanService, build_snapshot

pytestmark = pytest.mark.podman

WEB_HEALTH = {
    "command": ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/index.html"],
    "interval_s": 1,
    "timeout_s": 5,
    "retries": 5,
}


def digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


@dataclass
class Node:
    """A node folder plus the edge to its Podman: converge it the way the agent would."""

    edge: PodmanEdge
    paths: NodePaths
    podman: PodmanService
    serial: int = 0

    def write_jobs(self, **jobs: int) -> None:
        body = {"max_tokens": 256, "max_queue": 4, "timeout_s": 30, **jobs}
        staging = self.paths.runtime / ".jobs.json.tmp"
        staging.write_text(json.dumps(body), encoding="utf-8")
        os.replace(staging, self.paths.jobs_file)  # a new inode, as the agent writes it

    def specs(self, runtimes: Sequence[dict[str, Any]]) -> list[Any]:
        self.serial += 1
        snapshot = build_snapshot(runtimes=runtimes, models=[("m", "v1")], serial=self.serial)
        return container_specs(snapshot, config_digest=digest(self.serial), paths=self.paths)

    def plan(
        self, runtimes: Sequence[dict[str, Any]], notify: frozenset[str] = frozenset()
    ) -> tuple[ContainerPlan, list[Any]]:
        specs = self.specs(runtimes)
        return plan_containers(specs, self.edge.observe(), notify_runtimes=notify), specs

    def converge(
        self, runtimes: Sequence[dict[str, Any]], notify: frozenset[str] = frozenset()
    ) -> list[ActionOutcome]:
        planned, specs = self.plan(runtimes, notify)
        outcomes = self.edge.apply(planned, specs)
        after = plan_containers(specs, self.edge.observe())
        assert after.empty, after.describe()
        return outcomes

    def inspect(self, name: str) -> dict[str, Any]:
        result = self.podman.cli("container", "inspect", name)
        return dict(json.loads(result.stdout)[0])

    def exec(self, name: str, *command: str) -> str:
        return self.podman.cli("exec", name, *command).stdout

    def names(self) -> set[str]:
        listed = self.podman.cli("ps", "--all", "--format", "{{.Names}}").stdout
        return set(listed.split())


@pytest.fixture
def node(podman_clean: PodmanService, tmp_path: Path) -> Iterator[Node]:
    paths = NodePaths(tmp_path / "state")
    (paths.models / "m" / "v1").mkdir(parents=True)
    (paths.models / "m" / "v1" / "weights.bin").write_bytes(b"w")
    paths.runtime.mkdir(parents=True)
    edge = PodmanEdge(
        podman_clean.url, timeout_s=30, pull_timeout_s=120, stop_timeout_s=2, settle_s=0.3
    )
    result = Node(edge=edge, paths=paths, podman=podman_clean)
    result.write_jobs()
    with edge:
        yield result


def web(images: dict[str, str], **fields: Any) -> dict[str, Any]:
    return {
        "name": "web",
        "image": images["web"],
        "models": ["m:v1"],
        "health": WEB_HEALTH,
        **fields,
    }


def sleeper(images: dict[str, str], **fields: Any) -> dict[str, Any]:
    return {"name": "sleeper", "image": images["sleeper"], **fields}


# --- converging --------------------------------------------------------------------------------


def test_first_apply_creates_container_from_pinned_image_with_labels_and_readonly_mounts(
    node: Node, test_images: dict[str, str]
) -> None:
    outcomes = node.converge([web(test_images)])

    assert [(o.action.kind, o.ok) for o in outcomes] == [("pull", True), ("create", True)]
    info = node.inspect("reconciler-web")
    assert info["State"]["Status"] == "running"
    assert info["ImageName"] == test_images["web"]
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_RUNTIME] == "web"
    assert labels[LABEL_CONFIG_DIGEST] == digest(1)
    assert len(labels[LABEL_SPEC]) == 64
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert set(mounts) == {"/models/m/v1", "/run/reconciler"}
    assert not any(m["RW"] for m in mounts.values())
    assert mounts["/models/m/v1"]["Source"] == str(node.paths.models / "m" / "v1")
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["HostConfig"]["Privileged"] is False
    assert node.exec("reconciler-web", "cat", "/models/m/v1/weights.bin") == "w"
    assert (
        json.loads(node.exec("reconciler-web", "cat", "/run/reconciler/jobs.json"))["max_queue"]
        == 4
    )
    denied = node.podman.cli("exec", "reconciler-web", "touch", "/models/m/v1/x", check=False)
    assert denied.returncode != 0


def test_publishes_ports_on_loopback_through_the_reconciler_network(
    node: Node, test_images: dict[str, str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    node.converge([web(test_images, ports=[{"container": 8080, "host": host_port}])])

    info = node.inspect("reconciler-web")
    assert info["NetworkSettings"]["Ports"]["8080/tcp"] == [
        {"HostIp": "127.0.0.1", "HostPort": str(host_port)}
    ]
    assert set(info["NetworkSettings"]["Networks"]) == {"reconciler"}
    assert fetch_index(node) == b"web v1\n"

    # Stop-first with a host port: the new container is created while the old one holds the
    # port, and only started once the old one is gone.
    node.converge(
        [
            web(
                test_images,
                image=test_images["web2"],
                ports=[{"container": 8080, "host": host_port}],
            )
        ]
    )
    assert fetch_index(node) == b"web v2\n"
    assert node.names() == {"reconciler-web"}


def fetch_index(node: Node) -> bytes:
    address = node.edge.container_ip("reconciler-web")
    assert address
    with urllib.request.urlopen(f"http://{address}:8080/index.html", timeout=5) as page:
        return bytes(page.read())


def test_replaces_container_when_image_changes(node: Node, test_images: dict[str, str]) -> None:
    node.converge([web(test_images)])
    old_id = node.inspect("reconciler-web")["Id"]

    outcomes = node.converge([web(test_images, image=test_images["web2"])])

    assert [o.action.kind for o in outcomes] == ["pull", "replace"]
    new = node.inspect("reconciler-web")
    assert new["Id"] != old_id
    assert new["ImageName"] == test_images["web2"]
    assert old_id not in node.podman.cli("ps", "--all", "--no-trunc", "--format", "{{.ID}}").stdout
    assert node.names() == {"reconciler-web"}
    assert node.exec("reconciler-web", "cat", "/www/index.html") == "web v2\n"


def test_jobs_change_restarts_container_without_replacing_it(
    node: Node, test_images: dict[str, str]
) -> None:
    node.converge([web(test_images)])
    before = node.inspect("reconciler-web")

    node.write_jobs(max_queue=9)
    planned, _ = node.plan([web(test_images)], notify=frozenset({"web"}))
    assert [a.kind for a in planned.actions] == ["notify"]
    node.converge([web(test_images)], notify=frozenset({"web"}))

    after = node.inspect("reconciler-web")
    assert after["Id"] == before["Id"]
    assert after["State"]["StartedAt"] != before["State"]["StartedAt"]
    assert (
        json.loads(node.exec("reconciler-web", "cat", "/run/reconciler/jobs.json"))["max_queue"]
        == 9
    )


def test_restart_notification_lets_the_runtime_stop_gracefully(
    node: Node, test_images: dict[str, str]
) -> None:
    graceful = "trap 'echo stopping-gracefully; exit 0' TERM; while :; do sleep 0.2; done"
    runtimes = [sleeper(test_images, command=["sh", "-c", graceful])]
    node.converge(runtimes)

    node.write_jobs(max_queue=1)
    node.converge(runtimes, notify=frozenset({"sleeper"}))

    logs = node.podman.cli("logs", "reconciler-sleeper").stdout
    assert "stopping-gracefully" in logs


def test_jobs_change_signals_container_that_asks_for_a_signal(
    node: Node, test_images: dict[str, str]
) -> None:
    runtimes = [sleeper(test_images, notify="signal:HUP")]
    node.converge(runtimes)
    before = node.inspect("reconciler-sleeper")

    node.write_jobs(max_tokens=7)
    outcomes = node.converge(runtimes, notify=frozenset({"sleeper"}))

    assert [(o.action.kind, o.message) for o in outcomes] == [("notify", "sent SIGHUP")]
    after = node.inspect("reconciler-sleeper")
    assert (after["Id"], after["State"]["StartedAt"]) == (
        before["Id"],
        before["State"]["StartedAt"],
    )
    deadline = time.monotonic() + 5
    while not node.exec("reconciler-sleeper", "sh", "-c", "cat /tmp/hups 2>/dev/null || true"):
        assert time.monotonic() < deadline, "the runtime never saw SIGHUP"
        time.sleep(0.1)
    # The file was replaced (new inode) and the running process sees the new bytes.
    jobs = json.loads(node.exec("reconciler-sleeper", "cat", "/run/reconciler/jobs.json"))
    assert jobs["max_tokens"] == 7


def test_removes_container_when_runtime_is_dropped(node: Node, test_images: dict[str, str]) -> None:
    node.converge([web(test_images), sleeper(test_images)])
    assert node.names() == {"reconciler-web", "reconciler-sleeper"}

    outcomes = node.converge([web(test_images)])

    assert [(o.action.kind, o.action.container) for o in outcomes] == [
        ("remove", "reconciler-sleeper")
    ]
    assert node.names() == {"reconciler-web"}


# --- drift repair ------------------------------------------------------------------------------


def test_repairs_container_removed_by_hand(node: Node, test_images: dict[str, str]) -> None:
    node.converge([web(test_images)])
    node.podman.cli("rm", "--force", "--time", "0", "reconciler-web")

    outcomes = node.converge([web(test_images)])

    assert [o.action.kind for o in outcomes] == ["pull", "create"]
    assert node.inspect("reconciler-web")["State"]["Status"] == "running"


def test_repairs_container_stopped_by_hand(node: Node, test_images: dict[str, str]) -> None:
    node.converge([web(test_images)])
    old_id = node.inspect("reconciler-web")["Id"]
    node.podman.cli("stop", "--time", "1", "reconciler-web")

    outcomes = node.converge([web(test_images)])

    assert [o.action.kind for o in outcomes] == ["start"]
    info = node.inspect("reconciler-web")
    assert (info["Id"], info["State"]["Status"]) == (old_id, "running")


def test_replaces_container_whose_spec_label_was_edited_by_hand(
    node: Node, test_images: dict[str, str]
) -> None:
    node.converge([web(test_images)])
    node.podman.cli("rm", "--force", "--time", "0", "reconciler-web")
    forged = node.podman.cli(
        "run",
        "--detach",
        "--name",
        "reconciler-web",
        "--network",
        "none",
        "--label",
        f"{LABEL_MANAGED}=true",
        "--label",
        f"{LABEL_RUNTIME}=web",
        "--label",
        f"{LABEL_SPEC}={'0' * 64}",
        test_images["web"],
    ).stdout.strip()

    outcomes = node.converge([web(test_images)])

    assert [o.action.kind for o in outcomes] == ["pull", "replace"]
    info = node.inspect("reconciler-web")
    assert info["Id"] != forged
    assert info["Config"]["Labels"][LABEL_SPEC] != "0" * 64


def test_unmanaged_containers_with_similar_names_survive_every_pass(
    node: Node, test_images: dict[str, str]
) -> None:
    node.converge([web(test_images)])  # the image is local now, for the hand-made containers
    mine = {
        name: node.podman.cli(
            "run", "--detach", "--name", name, "--network", "none", test_images["web"]
        ).stdout.strip()
        for name in ("reconciler-web-mine", "reconciler-sleeper2", "web")
    }

    node.converge([web(test_images, image=test_images["web2"]), sleeper(test_images)])
    node.converge([sleeper(test_images)])
    node.converge([])

    for name, container_id in mine.items():
        info = node.inspect(name)
        assert (info["Id"], info["State"]["Status"]) == (container_id, "running")


def test_unmanaged_container_holding_a_desired_name_blocks_apply_untouched(
    node: Node, test_images: dict[str, str]
) -> None:
    node.converge([sleeper(test_images)])
    squatter = node.podman.cli(
        "run", "--detach", "--name", "reconciler-web", "--network", "none", test_images["sleeper"]
    ).stdout.strip()
    planned, specs = node.plan([web(test_images), sleeper(test_images)])
    assert [c.container for c in planned.conflicts] == ["reconciler-web"]

    with pytest.raises(ContainerError, match=r"reconciler-web .* without the managed label"):
        node.edge.apply(planned, specs)

    assert node.inspect("reconciler-web")["Id"] == squatter


# --- failures ----------------------------------------------------------------------------------


def test_digest_missing_from_registry_fails_pull_and_leaves_running_container_alone(
    node: Node, test_images: dict[str, str]
) -> None:
    node.converge([web(test_images)])
    before = node.inspect("reconciler-web")
    repository = test_images["web"].rsplit("@", 1)[0]
    planned, specs = node.plan([web(test_images, image=f"{repository}@sha256:{'e' * 64}")])
    recorded: list[ActionOutcome] = []

    with pytest.raises(RegistryError) as caught:
        node.edge.apply(planned, specs, on_outcome=recorded.append)

    line = caught.value.one_line()
    assert line.startswith("runtime web: pull reconciler-web: pulling ")
    assert "manifest unknown" in line
    assert [(o.action.kind, o.ok) for o in recorded] == [("pull", False)]
    after = node.inspect("reconciler-web")
    assert (after["Id"], after["State"]["StartedAt"]) == (
        before["Id"],
        before["State"]["StartedAt"],
    )


def test_offline_apply_refuses_to_pull_a_missing_image(
    node: Node, test_images: dict[str, str]
) -> None:
    planned, specs = node.plan([sleeper(test_images, command=["sleep", "60"])])
    if node.edge.has_image(test_images["sleeper"]):
        node.podman.cli("rmi", "--force", test_images["sleeper"])

    with pytest.raises(RegistryError, match="pulling is off"):
        node.edge.apply(planned, specs, allow_pull=False)
    assert node.names() == set()


def test_failing_health_command_is_a_snapshot_fault_and_leaves_no_container(
    node: Node, test_images: dict[str, str]
) -> None:
    health = {"command": ["sh", "-c", "echo not ready >&2; exit 1"], "interval_s": 1, "retries": 2}
    planned, specs = node.plan([sleeper(test_images, health=health)])

    with pytest.raises(SnapshotFaultError) as caught:
        node.edge.apply(planned, specs)

    line = caught.value.one_line()
    assert line.startswith("runtime sleeper: create reconciler-sleeper: health check failed 2")
    assert "exit 1 (not ready)" in line
    assert node.names() == set()


def test_container_that_exits_is_a_snapshot_fault(node: Node, test_images: dict[str, str]) -> None:
    planned, specs = node.plan([sleeper(test_images, command=["sh", "-c", "echo boom; exit 3"])])

    with pytest.raises(
        SnapshotFaultError, match=r"runtime sleeper: create reconciler-sleeper: .*boom"
    ):
        node.edge.apply(planned, specs)
    assert node.names() == set()


def test_command_that_does_not_exist_is_a_snapshot_fault(
    node: Node, test_images: dict[str, str]
) -> None:
    planned, specs = node.plan([sleeper(test_images, command=["no-such-binary"])])

    with pytest.raises(SnapshotFaultError, match=r"would not start.*no-such-binary"):
        node.edge.apply(planned, specs)
    assert node.names() == set()


def test_start_first_keeps_old_container_running_until_new_one_is_healthy(
    node: Node, test_images: dict[str, str]
) -> None:
    ready_health = {"command": ["test", "-e", "/tmp/ready"], "interval_s": 1, "retries": 8}
    old = sleeper(test_images, update="start-first", health={"command": ["true"]})
    node.converge([old])
    old_id = node.inspect("reconciler-sleeper")["Id"]
    slow_start = "trap 'exit 0' TERM; sleep 2; touch /tmp/ready; while :; do sleep 0.2; done"
    new = sleeper(
        test_images, update="start-first", command=["sh", "-c", slow_start], health=ready_health
    )

    samples: list[tuple[float, dict[str, tuple[str, str]]]] = []
    stop = threading.Event()

    def watch() -> None:
        with PodmanEdge(node.podman.url, timeout_s=10) as outside:
            while not stop.is_set():
                seen = {c.name: (c.id, c.state) for c in outside.observe() if c.managed}
                samples.append((time.monotonic(), seen))
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        node.converge([new])
    finally:
        stop.set()
        watcher.join()

    def running(seen: dict[str, tuple[str, str]], name: str) -> bool:
        return name in seen and seen[name][1] == "running"

    old_up = [
        t
        for t, seen in samples
        if seen.get("reconciler-sleeper", ("", ""))[0] == old_id
        and running(seen, "reconciler-sleeper")
    ]
    new_up = [t for t, seen in samples if running(seen, "reconciler-sleeper-NEXT")]
    assert new_up, "the new container was never seen running beside the old one"
    # The new one needs 2 s to become healthy; all that time the old one kept serving.
    assert max(old_up) - min(new_up) >= 1.5
    # And at no moment was there no running container for the runtime.
    for _, seen in samples:
        assert running(seen, "reconciler-sleeper") or running(seen, "reconciler-sleeper-NEXT")
    info = node.inspect("reconciler-sleeper")
    assert info["Id"] != old_id
    assert node.names() == {"reconciler-sleeper"}


def test_start_first_failure_leaves_old_container_serving(
    node: Node, test_images: dict[str, str]
) -> None:
    old = sleeper(test_images, update="start-first")
    node.converge([old])
    old_id = node.inspect("reconciler-sleeper")["Id"]
    broken = sleeper(
        test_images,
        update="start-first",
        health={"command": ["false"], "interval_s": 1, "retries": 1},
    )
    planned, specs = node.plan([broken])

    with pytest.raises(SnapshotFaultError, match="replace reconciler-sleeper"):
        node.edge.apply(planned, specs)

    assert node.names() == {"reconciler-sleeper"}
    info = node.inspect("reconciler-sleeper")
    assert (info["Id"], info["State"]["Status"]) == (old_id, "running")


# --- Podman unreachable, and nothing third-party escapes ---------------------------------------


def _dead_socket(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "dead.sock"
    if kind == "refusing":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))  # bound, never listening: connect() is refused
        listener.close()
    return f"unix://{path}"


@pytest.mark.parametrize("kind", ["missing", "refusing"])
def test_podman_socket_down_is_podman_unavailable_in_one_line(
    tmp_path: Path, test_images: dict[str, str], kind: str
) -> None:
    url = _dead_socket(tmp_path, kind)
    specs = container_specs(
        build_snapshot(runtimes=[{"name": "web", "image": test_images["web"]}]),
        config_digest=digest(1),
        paths=NodePaths(tmp_path / "state"),
    )
    with PodmanEdge(url, timeout_s=2) as edge:
        calls: dict[str, Callable[[], object]] = {
            "observe": edge.observe,
            "ping": edge.ping,
            "pull": lambda: edge.pull(test_images["web"]),
            "apply": lambda: edge.apply(plan_containers(specs, []), specs),
        }
        for what, call in calls.items():
            with pytest.raises(PodmanUnavailableError) as caught:
                call()
            line = caught.value.one_line()
            assert "\n" not in str(caught.value), what
            assert f"Podman at {url} unreachable" in line, (what, line)
            assert caught.value.__cause__ is not None


def _assert_own_error(call: Any) -> ReconcilerError:
    try:
        call()
    except ReconcilerError as exc:
        assert type(exc).__module__.startswith("reconciler.")
        assert "\n" not in str(exc)
        return exc
    except Exception as exc:  # the point of the test: name what leaked
        pytest.fail(f"{type(exc).__module__}.{type(exc).__name__} escaped: {exc}")
    pytest.fail("no error raised")


def test_no_podman_or_requests_exception_escapes(
    tmp_path: Path, podman_clean: PodmanService, test_images: dict[str, str]
) -> None:
    repository = test_images["web"].rsplit("@", 1)[0]
    with PodmanEdge(_dead_socket(tmp_path, "missing"), timeout_s=2) as dead:
        for call in (
            dead.observe,
            dead.ping,
            lambda: dead.container_ip("x"),
            lambda: dead.has_image(test_images["web"]),
        ):
            assert isinstance(_assert_own_error(call), PodmanUnavailableError)
    with PodmanEdge(podman_clean.url, timeout_s=10, pull_timeout_s=30) as live:
        broken = {
            "digest not in registry": f"{repository}@sha256:{'d' * 64}",
            "registry not there": f"127.0.0.1:9/reconciler/web@sha256:{'d' * 64}",
            "malformed reference": f"UPPER/Case@sha256:{'d' * 64}",
        }
        for what, image in broken.items():
            error = _assert_own_error(lambda image=image: live.pull(image))
            assert isinstance(error, RegistryError), (what, error)
        assert isinstance(
            _assert_own_error(lambda: live.container_ip("no-such-container")), ContainerError
        )
    assert isinstance(_assert_own_error(lambda: PodmanEdge("ftp://nowhere")), ReconcilerError)
