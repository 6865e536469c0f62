"""CDI specs (docs/contract.md §11): parsed and validated, checked before a runtime is created.

The first tests read real spec files from a temporary folder. The Podman tests write a
uniquely named spec into ``/etc/cdi`` (Podman 4.3 reads only ``/etc/cdi`` and ``/var/run/cdi``,
whatever ``cdi_spec_dirs`` says) that maps ``example.com/<unique class>=0`` to ``/dev/null``,
and always remove it: the private Podman service then really starts a container with that
device, through the real ``reconcile`` command, and the container sees it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.core.cdi import CdiInventory, CdiSpecError, parse_spec
from reconciler.runtime.cdi import read_inventory
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import (
    containers,
    converged,
    node_env,
    once,
    runtime,
    snapshot_body,
)
from tests.support.signing import RepositorySimulator

GOOD = """cdiVersion: "0.5.0"
kind: example.com/gpu
containerEdits:
  env: [SHARED=1]
devices:
  - name: "0"
    containerEdits:
      deviceNodes: [{path: /dev/gpu0, hostPath: /dev/null}]
  - name: all
    containerEdits:
      deviceNodes: [{path: /dev/gpu0, hostPath: /dev/null}]
"""


# ---- parsing and validation ----------------------------------------------------------------


def test_a_yaml_and_a_json_spec_are_read_and_define_their_fully_qualified_names(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    doc = {
        "cdiVersion": "0.6.0",
        "kind": "vendor.io/fpga",
        "devices": [{"name": "x:1", "containerEdits": {}}],
    }
    (tmp_path / "b.json").write_text(json.dumps(doc))
    (tmp_path / "notes.txt").write_text("not a spec")
    inventory = read_inventory([str(tmp_path), str(tmp_path / "absent")])
    assert [s.kind for s in inventory.specs] == ["example.com/gpu", "vendor.io/fpga"]
    assert inventory.invalid == ()
    assert [s.path for s in inventory.defining("example.com/gpu=0")] == [str(tmp_path / "a.yaml")]
    assert inventory.defining("example.com/gpu=all")
    assert inventory.defining("vendor.io/fpga=x:1")
    assert not inventory.defining("example.com/gpu=1")
    assert not inventory.defining("example.com/gpu")


def test_all_is_not_implied_by_the_devices_of_a_kind(tmp_path: Path) -> None:
    (tmp_path / "only0.yaml").write_text(GOOD.split("  - name: all")[0])
    inventory = read_inventory([str(tmp_path)])
    assert inventory.defining("example.com/gpu=0")
    assert not inventory.defining("example.com/gpu=all")


BAD = {
    "version.yaml": (GOOD.replace('"0.5.0"', "five"), "cdiVersion 'five' is not a version"),
    "kind.yaml": (GOOD.replace("example.com/gpu", "gpu"), "kind 'gpu' is not vendor/class"),
    "nodev.yaml": ('cdiVersion: "0.5.0"\nkind: a.b/c\ndevices: []\n', "devices is not a non-empty"),
    "noedits.yaml": (
        'cdiVersion: "0.5.0"\nkind: a.b/c\ndevices: [{name: "0"}]\n',
        "device '0' has no containerEdits",
    ),
    "twice.yaml": (GOOD.replace("name: all", 'name: "0"'), "device '0' is defined twice"),
    "badname.yaml": (GOOD.replace("name: all", 'name: "a b"'), "devices[1].name 'a b' is not"),
    "nodes.yaml": (GOOD.replace("[{path: /dev/gpu0, ", "[{ppath: /dev/gpu0, "), "without a path"),
    "broken.yaml": ("cdiVersion: [unclosed\n", "does not parse"),
    "list.json": ("[1, 2]", "not a mapping"),
}


def test_an_invalid_spec_is_listed_with_why_and_defines_nothing(tmp_path: Path) -> None:
    for name, (text, _) in BAD.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "good.yaml").write_text(GOOD.replace("example.com/gpu", "example.com/ok"))
    inventory = read_inventory([str(tmp_path)])
    assert [s.kind for s in inventory.specs] == ["example.com/ok"]
    why = {Path(path).name: text for path, text in inventory.invalid}
    assert set(why) == set(BAD)
    for name, (_, expected) in BAD.items():
        assert expected in why[name], (name, why[name])
    assert not inventory.defining("example.com/gpu=0")


def test_parse_spec_refuses_a_spec_wide_edit_of_the_wrong_type() -> None:
    with pytest.raises(CdiSpecError, match=r"containerEdits.env is not a list"):
        parse_spec(
            {
                "cdiVersion": "0.5.0",
                "kind": "a.b/c",
                "containerEdits": {"env": "X=1"},
                "devices": [{"name": "0", "containerEdits": {}}],
            },
            path="x",
            digest="0" * 64,
        )
    assert CdiInventory().defining("a.b/c=0") == ()


# ---- with the real Podman ------------------------------------------------------------------


def _spec(kind: str, marker: str) -> str:
    return f"""cdiVersion: "0.5.0"
kind: {kind}
devices:
  - name: "0"
    containerEdits:
      env: [RECONCILER_TEST_GPU={marker}]
      deviceNodes:
        - {{path: /dev/reconciler-gpu0, hostPath: /dev/null, type: c, major: 1, minor: 3}}
"""


@pytest.fixture
def cdi_kind() -> Iterator[tuple[str, Path]]:
    """A device class nobody else uses, and the path of its spec in /etc/cdi (removed after)."""
    unique = secrets.token_hex(4)
    path = Path("/etc/cdi") / f"reconciler-test-{unique}.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        pytest.skip(f"cannot write CDI specs into /etc/cdi: {exc}")
    try:
        yield f"example.com/t{unique}", path
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.podman
def test_a_device_is_given_an_undefined_one_is_held_and_a_regenerated_spec_replaces(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
    cdi_kind: tuple[str, Path],
) -> None:
    kind, spec_path = cdi_kind
    spec_path.write_text(_spec(kind, "v1"))
    env = node_env(podman_clean, tmp_path / "hooks")
    sleeper = test_images["sleeper"]
    body = {
        "runtimes": [
            runtime("plain", sleeper),
            runtime("gpu", sleeper, devices=[f"{kind}=0"]),
            runtime("gpu1", sleeper, devices=[f"{kind}=1"]),
        ]
    }
    simulator.publish(None, body=snapshot_body(**body))

    node.run("fetch", env=env).ok()
    plan = node.run("plan", env=env)
    assert plan.exit_code == 0, plan.stderr
    missing = f"device {kind}=1 is not defined by any CDI spec on this node"
    assert f"hold runtime gpu1: {missing}" in plan.stdout

    converged(once(node, env))
    ids = {c["name"]: c["id"] for c in containers(podman_clean) if c["state"] == "running"}
    assert sorted(ids) == ["reconciler-gpu", "reconciler-plain"]
    # The device node is there, and the spec's environment is the runtime process's own
    # (`podman exec` does not pass CDI env edits on to the commands it runs).
    seen = podman_clean.cli(
        "exec", "reconciler-gpu", "sh", "-c", "test -c /dev/reconciler-gpu0 && cat /proc/1/environ"
    ).stdout
    assert "RECONCILER_TEST_GPU=v1" in seen.split("\0")
    status = node.status()
    assert status["held"] == [{"runtime": "gpu1", "device": f"{kind}=1", "why": missing}]
    assert status["quarantined"] == [] and status["last_error"] is None
    assert status["gpus"]["source"] == "none"
    assert f"held        runtime gpu1: {missing}" in node.status_text()

    # nvidia-ctk cdi generate, again, with something changed: the gpu container is replaced.
    spec_path.write_text(_spec(kind, "v2"))
    converged(once(node, env))
    after = {c["name"]: c["id"] for c in containers(podman_clean) if c["state"] == "running"}
    assert after["reconciler-plain"] == ids["reconciler-plain"]
    assert after["reconciler-gpu"] != ids["reconciler-gpu"]
    seen = podman_clean.cli("exec", "reconciler-gpu", "cat", "/proc/1/environ").stdout
    assert "RECONCILER_TEST_GPU=v2" in seen.split("\0")
    assert "reconciler-gpu1" not in after
