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
import os
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from reconciler.desired import LABEL_RUNTIME
from tests.support.podman_fixtures import (
    IMAGES,
    PodmanService,
    Registry,
    free_port,
    kill_leftovers,
    manifest_digest,
    render_template,
    rootfs_tar,
    stop_group,
    wait_until,
)

__all__ = ["ApiProbe", "PodmanLab", "start_lab"]


@dataclass(frozen=True)
class PodmanLab:
    service: PodmanService
    registry: Registry
    images: dict[str, str]  # "sleeper" and "sleeper2" → pinned "host/repo@sha256:…"

    def remove_all_containers(self) -> None:
        self.service.cli("rm", "--all", "--force", "--time", "0", check=False)


def _start_registry(folder: Path, stack: contextlib.ExitStack) -> Registry:
    folder.mkdir(parents=True)
    host = f"127.0.0.1:{free_port()}"
    config = render_template("registry.yml", folder / "config.yml", TMP=str(folder), REGISTRY=host)
    log = folder / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(stop_group, process)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until(answers, what="docker-registry", process=process, log=log)
    return Registry(host=host, folder=folder)


def _start_service(folder: Path, registry: Registry, stack: contextlib.ExitStack) -> PodmanService:
    folder.mkdir(parents=True)
    for sub in ("libpod-tmp", "image-copy", "networks"):
        (folder / sub).mkdir()
    env = dict(os.environ)
    env.update(
        CONTAINERS_CONF=str(
            render_template("containers.conf", folder / "containers.conf", TMP=str(folder))
        ),
        CONTAINERS_STORAGE_CONF=str(
            render_template("storage.conf", folder / "storage.conf", TMP=str(folder))
        ),
        CONTAINERS_REGISTRIES_CONF=str(
            render_template("registries.conf", folder / "registries.conf", REGISTRY=registry.host)
        ),
    )
    env.pop("CONTAINER_HOST", None)
    sock = folder / "podman.sock"
    url = f"unix://{sock}"
    log = folder / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", url],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = PodmanService(url=url, env=env, folder=folder)

    def stop() -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            service.cli("rm", "--all", "--force", "--time", "0", check=False)
            service.cli("network", "prune", "--force", check=False)
        stop_group(process)
        # conmon outlives the service; only processes naming this lab's folder are killed.
        kill_leftovers(folder)

    stack.callback(stop)

    def answers() -> bool:
        if not sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
            except OSError:
                return False
        return True

    wait_until(answers, what="podman system service", process=process, log=log)
    return service


def _push_image(
    folder: Path, service: PodmanService, registry: Registry, *, name: str, index: str
) -> str:
    command = IMAGES["sleeper"][0]
    tar = rootfs_tar(folder, command_index=index)
    local = f"localhost/reconciler-bench/{name}:v1"
    remote = f"{registry.host}/reconciler/{name}:v1"
    service.cli("import", "--change", "CMD " + json.dumps(["sh", "-c", command]), str(tar), local)
    service.cli("push", "--tls-verify=false", local, remote)
    digest = manifest_digest(registry, f"reconciler/{name}", "v1")
    service.cli("rmi", "--force", local)
    return f"{registry.host}/reconciler/{name}@{digest}"


def start_lab(folder: Path, stack: contextlib.ExitStack) -> PodmanLab:
    registry = _start_registry(folder / "registry", stack)
    service = _start_service(folder / "podman", registry, stack)
    images = {
        name: _push_image(folder / f"image-{name}", service, registry, name=name, index=index)
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
