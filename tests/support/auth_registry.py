"""A loopback registry that wants a password, and a Podman service that may pull from it.

Session fixtures (each skips, with the reason, when a tool it needs is missing):

* ``auth_registry``: ``docker-registry serve`` on 127.0.0.1:<free port> with htpasswd auth
  (one user, bcrypt); yields an ``AuthRegistry`` (``.host``, ``.username``, ``.password``).
* ``auth_podman``: a private ``podman system service`` like ``podman_service``, but whose
  registries.conf lists both loopback registries (the plain ``registry`` and
  ``auth_registry``) as plain HTTP: the shared service knows only the plain one. Yields a
  ``PodmanService``.
* ``auth_images``: ``test_images``' ``web`` and ``web2`` copied (skopeo, ``--dest-creds``) from
  the plain registry into ``auth_registry``; yields ``{name: "<auth host>/reconciler/<name>@…"}``.

Function fixture ``auth_podman_clean``: ``auth_podman`` with no container and no image before
and after the test, so every test's pull really reaches a registry.

The htpasswd line is made with ``bcrypt`` if importable, else ``htpasswd -B`` (apache2-utils)
if installed, else the standard library's ``crypt`` (libxcrypt's ``$2b$``, which the
registry's Go bcrypt accepts) while Python still has it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.podman_fixtures import PodmanService, Registry, free_port, render_template

__all__ = [
    "AuthRegistry",
    "auth_images",
    "auth_podman",
    "auth_podman_clean",
    "auth_registry",
    "htpasswd_line",
]

USERNAME = "puller"
PASSWORD = "s3cret-Pa55-for-tests"  # a throwaway password for a loopback registry
_COPIED = ("web", "web2")


@dataclass(frozen=True)
class AuthRegistry:
    host: str  # 127.0.0.1:PORT
    folder: Path
    username: str
    password: str

    @property
    def creds(self) -> str:
        return f"{self.username}:{self.password}"


def htpasswd_line(user: str, password: str) -> str | None:
    """``user:<bcrypt hash>`` for an htpasswd file, or ``None`` if nothing here can make one."""
    with contextlib.suppress(ImportError):
        import bcrypt  # type: ignore[import-not-found]

        return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"
    if shutil.which("htpasswd"):
        done = subprocess.run(
            ["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt leaves Python in 3.13
        try:
            import crypt
        except ImportError:
            return None
    blowfish = getattr(crypt, "METHOD_BLOWFISH", None)
    if blowfish not in crypt.methods:
        return None
    hashed = crypt.crypt(password, crypt.mksalt(blowfish))
    return f"{user}:{hashed}" if hashed and hashed.startswith("$2") else None


# --- processes: the same care as podman_fixtures, in a few lines of our own ------------------


def _start(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _wait(
    ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return
        time.sleep(0.05)
    _stop(process)
    raise RuntimeError(f"{what} did not come up: {log.read_text(errors='replace')[-2000:]}")


def _kill_conmons(folder: Path) -> None:
    """conmon outlives its service; only processes naming ``folder`` are ours."""
    marker = (str(folder) + "/").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: registry auth tests need a real Podman service")
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed: registry auth tests need a registry")
    line = htpasswd_line(USERNAME, PASSWORD)
    if line is None:
        pytest.skip("no bcrypt, htpasswd (apache2-utils) or crypt: cannot write an htpasswd file")
    folder = tmp_path_factory.mktemp("auth-registry")
    (folder / "htpasswd").write_text(line + "\n", encoding="utf-8")
    host = f"127.0.0.1:{free_port()}"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f'storage:\n  filesystem:\n    rootdirectory: "{folder}/registry"\n'
        f'http:\n  addr: "{host}"\n'
        f'auth:\n  htpasswd:\n    realm: reconciler-tests\n    path: "{folder}/htpasswd"\n',
        encoding="utf-8",
    )
    log = folder / "registry.log"
    process = _start(["docker-registry", "serve", str(config)], log)

    def answers() -> bool:  # 401 without credentials: up, and asking for them
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1).close()
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        except OSError:
            return False
        raise RuntimeError(f"the registry at {host} answered /v2/ without credentials")

    _wait(answers, "docker-registry (htpasswd)", process, log)
    try:
        yield AuthRegistry(host=host, folder=folder, username=USERNAME, password=PASSWORD)
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def auth_podman(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, auth_registry: AuthRegistry
) -> Iterator[PodmanService]:
    folder = tmp_path_factory.mktemp("podman-auth")
    for sub in ("libpod-tmp", "image-copy", "networks"):
        (folder / sub).mkdir()
    registries = folder / "registries.conf"
    registries.write_text(
        "unqualified-search-registries = []\n"
        + "".join(
            f'[[registry]]\nlocation = "{host}"\ninsecure = true\n'
            for host in (registry.host, auth_registry.host)
        ),
        encoding="utf-8",
    )
    env = dict(os.environ)
    env.pop("CONTAINER_HOST", None)
    env.update(
        CONTAINERS_CONF=str(
            render_template("containers.conf", folder / "containers.conf", TMP=str(folder))
        ),
        CONTAINERS_STORAGE_CONF=str(
            render_template("storage.conf", folder / "storage.conf", TMP=str(folder))
        ),
        CONTAINERS_REGISTRIES_CONF=str(registries),
        # Not the machine's login: only what a pull is given may open the auth registry.
        REGISTRY_AUTH_FILE=str(folder / "service-auth.json"),
    )
    Path(env["REGISTRY_AUTH_FILE"]).write_text('{"auths": {}}\n', encoding="utf-8")
    sock = folder / "podman.sock"
    log = folder / "service.log"
    process = _start(["podman", "system", "service", "--time=0", f"unix://{sock}"], log, env)

    def answers() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
            except OSError:
                return False
        return True

    _wait(answers, "podman system service (auth tests)", process, log)
    service = PodmanService(url=f"unix://{sock}", env=env, folder=folder)
    try:
        yield service
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            service.cli("rm", "--all", "--force", "--time", "0", check=False)
            service.cli("network", "prune", "--force", check=False)
        _stop(process)
        _kill_conmons(folder)


@pytest.fixture
def auth_podman_clean(auth_podman: PodmanService) -> Iterator[PodmanService]:
    def wipe() -> None:
        auth_podman.cli("rm", "--all", "--force", "--time", "0", check=False)
        auth_podman.cli("rmi", "--all", "--force", check=False)

    wipe()
    yield auth_podman
    wipe()


@pytest.fixture(scope="session")
def auth_images(
    tmp_path_factory: pytest.TempPathFactory,
    auth_registry: AuthRegistry,
    test_images: dict[str, str],
) -> dict[str, str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed: it copies the test images into the auth registry")
    folder = tmp_path_factory.mktemp("auth-images")
    pinned: dict[str, str] = {}
    for name in _COPIED:
        digest_file = folder / f"{name}.digest"
        subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                "--dest-creds",
                auth_registry.creds,
                "--digestfile",
                str(digest_file),
                f"docker://{test_images[name]}",
                f"docker://{auth_registry.host}/reconciler/{name}:v1",
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        digest = digest_file.read_text(encoding="utf-8").strip()
        pinned[name] = f"{auth_registry.host}/reconciler/{name}@{digest}"
    return pinned
