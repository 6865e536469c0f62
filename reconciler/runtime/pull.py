"""Pull: make sure a pinned image (``name@sha256:…``) is in Podman's local storage.

Workflow position: the plan's ``pull`` actions come here through the executor, before any
container is touched; ``PodmanEdge.pull()`` and ``has_image()`` call it directly.

An image is pulled only if no image with its digest is there already. Registry credentials
(setting ``registry_auth_file``, see ``reconciler.runtime.registry_auth``) go to Podman with
that one pull, in the ``X-Registry-Auth`` header as podman-py's ``ImagesManager.pull
(auth_config=…)`` sends them. No matching entry: the pull goes without credentials and the
Podman service's own apply. A file that is missing, unreadable or malformed fails that pull.

What it may not do: put a password in a message or log (messages name the auth file's key
and path only); accept an image whose digest is not the pin; let a podman-py exception out.
Every failure to get the image is a ``RegistryError``, except that an unreachable Podman is
``PodmanUnavailableError``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from podman.api import encode_auth_header

from reconciler.core.errors import ContainerError, RegistryError, SettingsError
from reconciler.runtime.client import (
    THIRD_PARTY,
    PodmanConnection,
    body_reason,
    clip,
    http_status,
    timed_out,
)
from reconciler.runtime.registry_auth import registry_credentials

__all__ = ["local_image_id", "pull"]


def local_image_id(connection: PodmanConnection, image: str) -> str | None:
    """The id of the local image with the pinned digest of ``image``, or ``None``."""
    digest = image.rsplit("@", 1)[-1]
    try:
        with connection.guard(f"looking up image {image}"):
            attrs = connection.client.images.get(image).attrs
    except ContainerError as exc:
        if http_status(exc.__cause__) == 404:
            return None
        raise
    # The digest is what the pin promises; the repository part may be spelled differently
    # by Podman (normalised names), so only the digest is compared.
    repo_digests = [str(entry) for entry in attrs.get("RepoDigests") or []]
    if any(entry.endswith("@" + digest) for entry in repo_digests):
        return str(attrs["Id"])
    return None


def pull(
    connection: PodmanConnection,
    image: str,
    *,
    allow_pull: bool = True,
    auth_file: Path | None = None,
) -> str:
    """Make sure the pinned ``image`` is in local storage; return its image id.

    Nothing is fetched if an image with that digest is already there. With
    ``allow_pull=False`` (``reconcile once --offline``) a missing image is a
    ``RegistryError`` instead of a registry request.
    """
    local = local_image_id(connection, image)
    if local is not None:
        return local
    if not allow_pull:
        raise RegistryError(f"image {image} is not on this node and pulling is off (offline)")
    doing, headers = _credentials(image, auth_file)
    body = _request_pull(connection, image, headers=headers, doing=doing)
    # The libpod pull endpoint answers 200 before it knows the outcome and streams one
    # JSON object per line; a failed pull shows up as an "error" line.
    for line in body.splitlines():
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            if isinstance(report, dict) and report.get("error"):
                raise RegistryError(f"{doing}: {clip(str(report['error']))}")
    pulled = local_image_id(connection, image)
    if pulled is None:
        raise RegistryError(f"{doing}: the pulled image does not carry the pinned digest")
    return pulled


def _credentials(image: str, auth_file: Path | None) -> tuple[str, dict[str, str]]:
    """What the pull is called in messages, and the headers that carry its credentials."""
    doing = f"pulling {image}"
    if auth_file is None:
        return doing, {}
    try:
        credentials = registry_credentials(image, auth_file)
    except SettingsError as exc:
        raise RegistryError(f"{doing}: {exc.one_line()}") from exc
    if credentials is None:
        return doing, {}
    # Names the entry and the file, never the secret.
    doing += f" (credentials for {credentials.key} from {auth_file})"
    encoded = encode_auth_header(credentials.auth_config())
    return doing, {"X-Registry-Auth": encoded.decode("ascii")}


def _request_pull(
    connection: PodmanConnection, image: str, *, headers: dict[str, str], doing: str
) -> str:
    """Ask Podman to pull; the streamed body of its answer."""
    try:
        response = connection.client.api.post(
            "/images/pull",
            params={"reference": image, "policy": "missing"},
            headers=headers or None,
            timeout=connection.pull_timeout_s,
        )
        code = int(response.status_code)
        body = str(response.text)
    except THIRD_PARTY as exc:
        if timed_out(exc):
            raise RegistryError(
                f"{doing}: Podman silent for {connection.pull_timeout_s:g} s (pull_timeout_s)"
            ) from exc
        connection.raise_mapped(exc, doing)
    if code >= 400:
        raise RegistryError(f"{doing}: Podman answered {code}: {body_reason(body)}")
    return body
