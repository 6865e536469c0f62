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
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.podman_fixtures import (
    PodmanService,
    Registry,
    start_podman_service,
    start_registry,
)

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
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(line + "\n", encoding="utf-8")
    with contextlib.ExitStack() as stack:
        served = start_registry(folder, stack, htpasswd=htpasswd)
        yield AuthRegistry(host=served.host, folder=folder, username=USERNAME, password=PASSWORD)


@pytest.fixture(scope="session")
def auth_podman(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, auth_registry: AuthRegistry
) -> Iterator[PodmanService]:
    folder = tmp_path_factory.mktemp("podman-auth")
    # Not the machine's login: only what a pull is given may open the auth registry.
    service_auth = folder / "service-auth.json"
    service_auth.write_text('{"auths": {}}\n', encoding="utf-8")
    with contextlib.ExitStack() as stack:
        yield start_podman_service(
            folder,
            registry,
            stack,
            also_trust=[auth_registry.host],
            env={"REGISTRY_AUTH_FILE": str(service_auth)},
        )


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
