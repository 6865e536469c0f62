"""Registry credentials from a containers-auth.json(5) file (setting ``registry_auth_file``).

Workflow position: asked by ``reconciler.runtime.pull`` when an image has to be pulled. The
file is read at each such pull (not at start), and the entry for the image's registry is
looked up most specific key first (``host/namespace/repo``, then ``host/namespace``, then
``host``), as containers/image does.

Everything here is pure except ``load_registry_auth`` (and ``registry_credentials``, which
calls it), which reads the file. What it may not do: put a password or an ``auth`` value in a
message, a ``repr`` or a log; talk to Podman or a registry. A file that is missing, unreadable
or malformed, or that someone other than root or the agent's user could have written (strict
modes, ``disk.strict``), is a ``SettingsError`` that names the file and what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.core.errors import SettingsError
from reconciler.disk.credentials import credentials_json, read_credentials

__all__ = [
    "RegistryCredentials",
    "auth_scopes",
    "load_registry_auth",
    "match_auth_key",
    "parse_registry_auth",
    "registry_credentials",
]

_AUTH_FILE_LIMIT = 1 << 20  # bytes: a containers-auth.json is a few hundred
# Spellings of Docker Hub in auth files and image names; containers/image treats them as one.
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class RegistryCredentials:
    """The credentials an auth file holds for one image; ``repr`` leaves the password out."""

    key: str  # the auth file's key that matched, normalised (e.g. ``127.0.0.1:5000/team``)
    username: str
    password: str = field(repr=False)

    def auth_config(self) -> dict[str, str]:
        """What podman-py's ``auth_config`` takes (sent as the ``X-Registry-Auth`` header)."""
        return {"username": self.username, "password": self.password}


def _image_name(image: str) -> str:
    """``host[:port]/path`` of an image reference: without digest and tag, registry explicit.

    As Docker and containers/image read a reference, the first component is a registry only
    if it has a ``.`` or a ``:`` or is ``localhost``; otherwise the image is on Docker Hub
    (``docker.io``, ``library/`` for a single component).
    """
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1 :]:
        name = name[: name.rindex(":")]
    first, sep, rest = name.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        rest = name if sep else f"library/{name}"
        first = _DOCKER_HUB
    if first in _DOCKER_HUB_ALIASES:
        first = _DOCKER_HUB
    return f"{first}/{rest}"


def auth_scopes(image: str) -> list[str]:
    """The auth file keys that can apply to ``image``, most specific first.

    ``127.0.0.1:5000/team/web@sha256:…`` → ``127.0.0.1:5000/team/web``,
    ``127.0.0.1:5000/team``, ``127.0.0.1:5000``.
    """
    parts = _image_name(image).split("/")
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _normalise_key(key: str) -> str:
    """An auth file key as containers/image compares it.

    A key with a scheme is Docker's legacy form (``https://index.docker.io/v1/``): only its
    host counts. Docker Hub's host names all mean ``docker.io``.
    """
    stripped = key.removeprefix("http://").removeprefix("https://")
    if stripped != key:
        stripped = stripped.split("/", 1)[0]
    stripped = stripped.rstrip("/")
    host, sep, path = stripped.partition("/")
    if host in _DOCKER_HUB_ALIASES:
        host = _DOCKER_HUB
    return host + sep + path


def match_auth_key(image: str, keys: Iterable[str]) -> str | None:
    """The key among ``keys`` whose entry applies to ``image`` (most specific), or ``None``.

    Pure: ``keys`` are the auth file's keys as written; the one returned is as written too.
    A key spelled exactly as the scope wins over a legacy spelling of the same scope.
    """
    by_scope: dict[str, str] = {}
    for key in keys:
        scope = _normalise_key(key)
        if scope not in by_scope or key == scope:
            by_scope[scope] = key
    for scope in auth_scopes(image):
        if scope in by_scope:
            return by_scope[scope]
    return None


def parse_registry_auth(raw: bytes, *, where: str) -> dict[str, Any]:
    """The ``auths`` object of a containers-auth.json file's bytes; ``SettingsError`` if
    unusable, its message starting with ``where``."""
    document = credentials_json(raw, where=where)
    if not isinstance(document, dict):
        raise SettingsError(f"{where} is not a JSON object")
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise SettingsError(f'{where}: "auths" is not an object')
    return auths


def load_registry_auth(path: Path) -> dict[str, Any]:
    """The ``auths`` object of a containers-auth.json file; ``SettingsError`` if unusable."""
    where = f"registry_auth_file {path}"
    raw = read_credentials(path, setting="registry_auth_file", limit=_AUTH_FILE_LIMIT)
    return parse_registry_auth(raw, where=where)


def _entry_credentials(key: str, entry: Any, *, where: str) -> RegistryCredentials:
    """User and password of one ``auths`` entry: ``auth`` (base64 of ``user:password``) or
    ``username`` and ``password``. Messages name the key, never a value."""
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: the entry for {key!r} is not an object")
    scope = _normalise_key(key)
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise SettingsError(f'{where}: "auth" of {key!r} is not a string')
        try:
            decoded = base64.b64decode(auth.encode("ascii")).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            decoded = ""
        user, sep, secret = decoded.partition(":")
        if not sep or not user:
            raise SettingsError(f'{where}: "auth" of {key!r} is not base64 of user:password')
        return RegistryCredentials(scope, user, secret)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return RegistryCredentials(scope, username, password)
    raise SettingsError(f'{where}: the entry for {key!r} has no "auth" nor username and password')


def registry_credentials(image: str, path: Path) -> RegistryCredentials | None:
    """The credentials ``path`` holds for ``image``; ``None`` when no entry applies.

    Raises ``SettingsError`` when the file is missing, unreadable or malformed, or when the
    entry that applies carries no usable credentials (other entries are not judged).
    """
    auths = load_registry_auth(path)
    key = match_auth_key(image, auths)
    if key is None:
        return None
    return _entry_credentials(key, auths[key], where=f"registry_auth_file {path}")
