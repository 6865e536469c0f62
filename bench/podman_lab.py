"""A private Podman service, a loopback registry and two sleeper images, for benchmarks.

The same set-up as the test suite's session fixtures (``tests/support/podman_fixtures.py``,
whose helpers and templates are reused): ``docker-registry`` on a free loopback port, ``podman
system service`` with its own containers.conf / storage.conf / registries.conf in the bench's
scratch folder, and busybox images made with ``podman import`` and pushed, so that converging
really pulls. Started once per ``bench/run.py`` (``Context.shared``) and torn down at the end:
containers and networks removed through the API, then the processes this lab started.

``ApiProbe`` watches containers from outside the agent, through the Podman REST API on the
service's socket, the way a monitoring system would.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from reconciler.core.specs import LABEL_RUNTIME
from tests.support.podman_fixtures import (
    IMAGES,
    PodmanService,
    Registry,
    push_image,
    start_podman_service,
    start_registry,
)

__all__ = ["ApiProbe", "PodmanLab", "start_lab"]


@dataclass(frozen=True)
class PodmanLab:
    service: PodmanService
    registry: Registry
    images: dict[str, str]  # "sleeper" and "sleeper2" → pinned "host/repo@sha256:…"

    def remove_all_containers(self) -> None:
        self.service.cli("rm", "--all", "--force", "--time", "0", check=False)


def start_lab(folder: Path, stack: contextlib.ExitStack) -> PodmanLab:
    (folder / "registry").mkdir(parents=True)
    registry = start_registry(folder / "registry", stack)
    (folder / "podman").mkdir()
    service = start_podman_service(folder / "podman", registry, stack)
    command = IMAGES["sleeper"][0]
    images = {
        name: push_image(
            folder / f"image-{name}",
            service,
            registry,
            name=name,
            command=command,
            index=index,
            local_repo="reconciler-bench",
        )
        for name, index in (("sleeper", "sleeper v1\n"), ("sleeper2", "sleeper v2\n"))
    }
    return PodmanLab(service=service, registry=registry, images=images)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, *, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiProbe:
    """``GET /libpod/containers/json`` over the service's socket, one kept-alive connection."""

    def __init__(self, service_url: str, *, timeout_s: float = 5.0) -> None:
        self._path = service_url.removeprefix("unix://")
        self._timeout = timeout_s
        self._connection = _UnixConnection(self._path, timeout=timeout_s)

    def states(self, runtime: str) -> list[str]:
        """The state of every container labelled with ``runtime`` (running, exited, …)."""
        filters = quote(json.dumps({"label": [f"{LABEL_RUNTIME}={runtime}"]}))
        path = f"/v4.0.0/libpod/containers/json?all=true&filters={filters}"
        try:
            self._connection.request("GET", path)
            response = self._connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._connection.close()
            self._connection = _UnixConnection(self._path, timeout=self._timeout)
            raise
        if response.status != 200:
            raise RuntimeError(f"Podman API answered {response.status}: {body[:200]!r}")
        return [str(c.get("State", "")) for c in json.loads(body)]

    def close(self) -> None:
        self._connection.close()
