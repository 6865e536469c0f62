"""A private Podman service, a loopback image registry and tiny test images.

Session fixtures (all skip, with the reason, when the podman binary is not installed):

* ``registry``: ``docker-registry serve`` on 127.0.0.1:<free port>, storage in a temp folder;
  yields a ``Registry`` (``.host`` = ``127.0.0.1:PORT``, ``.url``).
* ``podman_service``: ``podman system service --time=0 unix://<tmp>/podman.sock`` with its own
  containers.conf and storage.conf (``tests/support/podman_env/``, rendered into the temp
  folder) and a registries.conf that trusts only the loopback registry, so the machine's own
  containers, images, networks and locks are never touched; yields a ``PodmanService``
  (``.url``, ``.env``, ``.cli(...)``). At the end every container and network it made is
  removed and the service's process group is killed.
* ``test_images``: small images built from busybox-static with ``podman import``, pushed to
  the registry and then deleted locally (so applying really pulls); yields
  ``{name: "127.0.0.1:PORT/reconciler/<name>@sha256:<hex>"}`` for the names in ``IMAGES``.

Function fixture ``podman_clean``: the service, with every container removed after the test.

Also ``snapshot_payload()`` / ``build_snapshot()``: schema-valid snapshot documents for tests.

``start_registry()``, ``start_podman_service()`` and ``push_image()`` are what the session
fixtures run, for set-ups outside pytest too (``bench/podman_lab.py``).

Sandbox notes: crun cannot run containers here (runc is used), Podman runs no health timers
(no systemd), and a port published through netavark may not answer on 127.0.0.1, so tests
probe a container through its own IP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.documents import Snapshot
from reconciler.core.schema import validate

ENV_TEMPLATES = Path(__file__).resolve().parent / "podman_env"
ZERO_DIGEST = "sha256:" + "0" * 64

_TERM_FAST = "trap 'exit 0' TERM"
# name → (command baked into the image, content of /www/index.html)
IMAGES: dict[str, tuple[str, str]] = {
    # An HTTP server on 8080 that answers with its version; exits at once on SIGTERM.
    "web": (f"{_TERM_FAST}; httpd -f -p 8080 -h /www & wait", "web v1\n"),
    "web2": (f"{_TERM_FAST}; httpd -f -p 8080 -h /www & wait", "web v2\n"),
    # Records each SIGHUP in /tmp/hups; otherwise idles.
    "sleeper": (
        f"{_TERM_FAST}; trap 'date +%s >> /tmp/hups' HUP; while :; do sleep 0.2; done",
        "sleeper\n",
    ),
}
_APPLETS: tuple[str, ...] = ("sh", "cat", "echo", "sleep", "httpd", "wget", "ls", "test")
_APPLETS += ("true", "false", "kill", "date", "touch", "mkdir", "rm", "env", "grep")


# --- snapshot documents ---------------------------------------------------------------------


def snapshot_payload(
    *,
    runtimes: Sequence[dict[str, Any]] = (),
    models: Sequence[tuple[str, str]] = (),
    jobs: dict[str, int] | None = None,
    serial: int = 1,
) -> dict[str, Any]:
    """A snapshot payload with the given runtimes and (name, version) models, one file each."""
    return {
        "network": "testnet",
        "serial": serial,
        "issued_at": "2024-01-01T00:00:00Z",
        "expires": "2099-01-01T00:00:00Z",
        "models": [
            {
                "name": name,
                "version": version,
                "files": [{"path": "weights.bin", "size": 1, "digest": ZERO_DIGEST, "urls": ["x"]}],
            }
            for name, version in models
        ],
        "runtimes": list(runtimes),
        "jobs": jobs or {"max_tokens": 256, "max_queue": 4, "timeout_s": 30},
        "participation": {"modes": ["testnet"], "subclouds": []},
        "ttl": {
            "poll_s": 60,
            "heartbeat_s": 60,
            "retry_min_s": 1,
            "retry_max_s": 60,
            "cache_s": 60,
        },
        "updates": {
            "agent": {"version": "1.0.0", "digest": ZERO_DIGEST},
            "runtime": {"version": "1.0.0", "digest": ZERO_DIGEST},
        },
    }


def build_snapshot(*, schema: bool = True, **kwargs: Any) -> Snapshot:
    """``snapshot_payload(**kwargs)`` parsed; checked against the schema unless told not to."""
    payload = snapshot_payload(**kwargs)
    if schema:
        validate("snapshot", payload)
    return Snapshot.from_payload(payload)


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_template(template: str, target: Path, **values: str) -> Path:
    """``podman_env/<template>`` with every ``@KEY@`` set to ``values[KEY]``, as ``target``."""
    text = (ENV_TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target.write_text(text, encoding="utf-8")
    return target


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process``'s group, SIGKILL it after 10 s; nothing if it has already exited."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def kill_leftovers(folder: Path) -> None:
    """SIGKILL processes whose command line names ``folder`` (only this service's own).

    conmon outlives the service: it monitors containers, and for exec sessions (every health
    probe, every ``podman exec``) it lingers 300 s after the command ended.
    """
    marker = (str(folder) + "/").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def wait_until(
    ready: Callable[[], bool], *, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll ``ready()`` for 30 s; else stop ``process`` and raise with the tail of ``log``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if ready():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    stop_group(process)
    raise RuntimeError(f"{what} did not come up: {tail}")


def _require_podman() -> str:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed: container tests need a real Podman service")
    return podman


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    folder: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@dataclass(frozen=True)
class PodmanService:
    url: str  # unix:///…/podman.sock
    env: dict[str, str]  # for `podman --url …` commands run by tests
    folder: Path

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman --url <service> ARGS`` (the remote client, never the local storage)."""
        return subprocess.run(
            ["podman", "--url", self.url, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )


def start_registry(
    folder: Path, stack: contextlib.ExitStack, *, htpasswd: Path | None = None
) -> Registry:
    """``docker-registry serve`` on a free loopback port, storage in ``folder``; ``stack``
    stops it. With ``htpasswd`` (a bcrypt htpasswd file) it asks every client for a password,
    and counts as up once it answers 401 to a request without one."""
    host = f"127.0.0.1:{free_port()}"
    config = render_template("registry.yml", folder / "config.yml", TMP=str(folder), REGISTRY=host)
    if htpasswd is not None:
        with config.open("a", encoding="utf-8") as out:
            out.write(f'auth:\n  htpasswd:\n    realm: reconciler-tests\n    path: "{htpasswd}"\n')
    log = folder / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as response:
                if htpasswd is not None:
                    raise RuntimeError(f"the registry at {host} answered without a password")
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return htpasswd is not None and exc.code == 401
        except (urllib.error.URLError, OSError):
            return False

    wait_until(answers, what="docker-registry", process=process, log=log)
    stack.callback(stop_group, process)
    return Registry(host=host, folder=folder)


def private_podman_env(folder: Path, registry_hosts: Sequence[str], **more: str) -> dict[str, str]:
    """The environment of a Podman confined to ``folder``: containers.conf and storage.conf
    rendered from ``podman_env/`` into it, a registries.conf that trusts each of
    ``registry_hosts`` over plain HTTP, the machine's ``CONTAINER_HOST`` dropped, ``more``
    added."""
    for sub in ("libpod-tmp", "image-copy", "networks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    registries = folder / "registries.conf"
    lines = ["unqualified-search-registries = []"]
    for host in registry_hosts:
        lines += ["", "[[registry]]", f'location = "{host}"', "insecure = true"]
    registries.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ)
    # A CONTAINER_HOST inherited from the developer's shell would send CLI calls elsewhere.
    env.pop("CONTAINER_HOST", None)
    env.update(
        CONTAINERS_CONF=str(
            render_template("containers.conf", folder / "containers.conf", TMP=str(folder))
        ),
        CONTAINERS_STORAGE_CONF=str(
            render_template("storage.conf", folder / "storage.conf", TMP=str(folder))
        ),
        CONTAINERS_REGISTRIES_CONF=str(registries),
        **more,
    )
    return env


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start_podman_service(
    folder: Path,
    registry: Registry,
    stack: contextlib.ExitStack,
    *,
    also_trust: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> PodmanService:
    """``podman system service`` on ``folder``/podman.sock with its own configuration in
    ``folder``, pulling from ``registry`` (and the registries ``also_trust`` names), with
    ``env`` added to its environment; ``stack`` removes its containers and stops it."""
    service_env = private_podman_env(folder, [registry.host, *also_trust], **(env or {}))
    sock = folder / "podman.sock"
    url = f"unix://{sock}"
    log = folder / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", url],
            env=service_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_until(lambda: socket_answers(sock), what="podman system service", process=process, log=log)
    service = PodmanService(url=url, env=service_env, folder=folder)

    def stop() -> None:
        # Containers run under conmon, outside the service's process group: remove them
        # through the API first, then the networks they used, then stop the service.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            service.cli("rm", "--all", "--force", "--time", "0", check=False)
            service.cli("network", "prune", "--force", check=False)
        stop_group(process)
        kill_leftovers(folder)

    stack.callback(stop)
    return service


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    _require_podman()
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed: image pulls need a loopback registry")
    with contextlib.ExitStack() as stack:
        yield start_registry(tmp_path_factory.mktemp("registry"), stack)


@pytest.fixture(scope="session")
def podman_service(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[PodmanService]:
    _require_podman()
    with contextlib.ExitStack() as stack:
        # Short: a unix socket path must fit in 108 bytes.
        yield start_podman_service(tmp_path_factory.mktemp("podman"), registry, stack)


@pytest.fixture
def podman_clean(podman_service: PodmanService) -> Iterator[PodmanService]:
    """The Podman service; every container (managed or not) is removed after the test."""
    yield podman_service
    podman_service.cli("rm", "--all", "--force", "--time", "0", check=False)


def rootfs_tar(folder: Path, *, command_index: str) -> Path:
    """A busybox root file system in ``folder``/rootfs.tar, ``command_index`` as /www/index.html."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        pytest.skip("busybox(-static) is not installed: test images are built from it")
    root = folder / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    (root / "tmp").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in _APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text(command_index, encoding="utf-8")
    tar = folder / "rootfs.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(root, arcname=".")
    return tar


def manifest_digest(registry: Registry, repository: str, tag: str) -> str:
    """The ``sha256:`` digest ``registry`` gives for ``repository:tag``'s manifest."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={
            "Accept": ", ".join(
                [
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ]
            )
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        digest = response.headers["Docker-Content-Digest"]
    if not digest or not digest.startswith("sha256:"):
        raise RuntimeError(f"registry gave no digest for {repository}:{tag}")
    return str(digest)


def push_image(
    folder: Path,
    service: PodmanService,
    registry: Registry,
    *,
    name: str,
    command: str,
    index: str,
    local_repo: str,
) -> str:
    """Image ``name`` (runs ``command``, serves ``index``) made with ``podman import`` in
    ``folder``, pushed to ``registry`` and deleted locally; its pinned reference."""
    tar = rootfs_tar(folder, command_index=index)
    local = f"localhost/{local_repo}/{name}:v1"
    remote = f"{registry.host}/reconciler/{name}:v1"
    service.cli("import", "--change", "CMD " + json.dumps(["sh", "-c", command]), str(tar), local)
    service.cli("push", "--tls-verify=false", local, remote)
    digest = manifest_digest(registry, f"reconciler/{name}", "v1")
    # Gone from local storage, so the first apply has to pull it from the registry.
    service.cli("rmi", "--force", local)
    return f"{registry.host}/reconciler/{name}@{digest}"


@pytest.fixture(scope="session")
def test_images(
    tmp_path_factory: pytest.TempPathFactory, podman_service: PodmanService, registry: Registry
) -> dict[str, str]:
    return {
        name: push_image(
            tmp_path_factory.mktemp(f"image-{name}"),
            podman_service,
            registry,
            name=name,
            command=command,
            index=index,
            local_repo="reconciler-test",
        )
        for name, (command, index) in IMAGES.items()
    }
