"""Services a fault test may stop and start at will, apart from the session's own.

* ``PrivatePodman``: a second ``podman system service`` with its own storage, run folder and
  socket, rendered from the same templates as the session service
  (tests/support/podman_env/), so that stopping it in the middle of an apply disturbs no
  other test. Its registries.conf trusts every loopback registry it is given.
* ``PrivateRegistry``: ``docker-registry`` on a port of its own, serving the storage folder
  of the session registry read-only in effect (nothing pushes to it), so the session's test
  images are pullable from a registry a test can take down and bring back on the same port.

Containers outlive their service (conmon runs them), as on a real node; ``close()`` removes
them, stops the service and kills what is left of this service's own processes.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.podman_fixtures import (
    PodmanService,
    Registry,
    free_port,
    kill_leftovers,
    private_podman_env,
    render_template,
    socket_answers,
    stop_group,
    wait_until,
)

__all__ = ["PrivatePodman", "PrivateRegistry", "free_port"]


class PrivatePodman:
    def __init__(self, folder: Path, *, registries: list[str]) -> None:
        self.folder = folder
        env = private_podman_env(folder, registries)
        self.socket = folder / "podman.sock"
        self.service = PodmanService(url=f"unix://{self.socket}", env=env, folder=folder)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.service.url

    def start(self) -> None:
        log = (self.folder / "service.log").open("ab")
        self._process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            env=self.service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        wait_until(
            lambda: socket_answers(self.socket),
            what="private podman service",
            process=self._process,
            log=self.folder / "service.log",
        )

    def stop(self) -> None:
        """The service goes away; its containers keep running under conmon."""
        if self._process is not None:
            stop_group(self._process)
        self._process = None
        self.socket.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if self._process is None:
                self.start()
            self.service.cli("rm", "--all", "--force", "--time", "0", check=False)
            self.service.cli("network", "prune", "--force", check=False)
        self.stop()
        kill_leftovers(self.folder)


class PrivateRegistry:
    """A registry on its own port serving the session registry's images."""

    def __init__(self, folder: Path, *, serving: Registry) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.host = f"127.0.0.1:{free_port()}"
        # The template puts storage at @TMP@/registry: point @TMP@ at the session's folder.
        self.config = render_template(
            "registry.yml", folder / "config.yml", TMP=str(serving.folder), REGISTRY=self.host
        )
        self._process: subprocess.Popen[bytes] | None = None

    def image(self, pinned: str) -> str:
        """The same pinned image, named through this registry."""
        return self.host + "/" + pinned.split("/", 1)[1]

    def start(self) -> None:
        log = (self.folder / "registry.log").open("ab")
        self._process = subprocess.Popen(
            ["docker-registry", "serve", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(
            answers,
            what="private registry",
            process=self._process,
            log=self.folder / "registry.log",
        )

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process)
        self._process = None
