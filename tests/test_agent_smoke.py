"""End to end through the CLI: a served origin, real Podman, real registry, real git."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import served_model
from tests.support.signing import RepositorySimulator, base_snapshot

pytestmark = pytest.mark.podman


def test_once_brings_up_runtime_and_model(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
) -> None:
    body = base_snapshot()
    body["models"] = [
        served_model(file_server, "tiny", "v1", {"a.bin": b"a" * 1000, "b/c.txt": b"c"})
    ]
    body["runtimes"] = [{"name": "web", "image": test_images["web"], "models": ["tiny:v1"]}]
    simulator.publish(body=body)
    env = {
        "RECONCILER_PODMAN_URL": podman_clean.url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(tmp_path / "hooks"),
    }
    first = node.run("once", env=env)
    assert first.exit_code == 0, first.stdout + first.stderr
    ps = json.loads(podman_clean.cli("ps", "--format", "json").stdout)
    assert [c["Names"][0] for c in ps] == ["reconciler-web"]
    tree = node.state_dir / "models" / "tiny" / "v1"
    assert (tree / "a.bin").read_bytes() == b"a" * 1000
    status = node.status()
    assert status["converged"] is True
    second = node.run("once", env=env)
    assert second.exit_code == 0, second.stdout + second.stderr
    assert "converged" in second.stdout
