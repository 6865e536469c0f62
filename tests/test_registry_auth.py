"""Setting ``registry_auth_file``: credentials from a containers-auth.json file for pulls.

The matching logic is tested as pure functions first. Then against a real Podman service and
two real loopback registries (``tests/support/auth_registry.py``): one that wants a password
(htpasswd) and the plain one of ``podman_fixtures``. The node-level test drives the real
``reconcile once`` against a served origin.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from reconciler.core.errors import RegistryError, SettingsError
from reconciler.runtime.podman import PodmanEdge
from reconciler.runtime.registry_auth import (
    RegistryCredentials,
    auth_scopes,
    match_auth_key,
    registry_credentials,
)
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import HEALTHY, node_env, running
from tests.support.signing import RepositorySimulator, base_snapshot

if TYPE_CHECKING:
    from tests.support.auth_registry import AuthRegistry

pytest_plugins = ["tests.support.auth_registry"]  # auth_registry, auth_podman, auth_images

IMAGE = "127.0.0.1:5000/team/web@sha256:" + "a" * 64


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_auth(path: Path, auths: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"auths": auths}), encoding="utf-8")
    return path


# ---- the matching logic (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "scopes"),
    [
        (IMAGE, ["127.0.0.1:5000/team/web", "127.0.0.1:5000/team", "127.0.0.1:5000"]),
        ("127.0.0.1:5000/team/web:v1@sha256:" + "a" * 64, None),  # the tag does not count
        (
            "reg.example/a/b/c:tag",
            ["reg.example/a/b/c", "reg.example/a/b", "reg.example/a", "reg.example"],
        ),
        ("localhost/web@sha256:" + "b" * 64, ["localhost/web", "localhost"]),
        (
            "busybox@sha256:" + "b" * 64,
            ["docker.io/library/busybox", "docker.io/library", "docker.io"],
        ),
        ("team/web", ["docker.io/team/web", "docker.io/team", "docker.io"]),
        ("index.docker.io/team/web", ["docker.io/team/web", "docker.io/team", "docker.io"]),
    ],
)
def test_scopes_go_from_the_repository_to_the_host(image: str, scopes: list[str] | None) -> None:
    expected = scopes or ["127.0.0.1:5000/team/web", "127.0.0.1:5000/team", "127.0.0.1:5000"]
    assert auth_scopes(image) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            ["127.0.0.1:5000", "127.0.0.1:5000/team", "127.0.0.1:5000/team/web"],
            "127.0.0.1:5000/team/web",
        ),
        (["127.0.0.1:5000", "127.0.0.1:5000/team"], "127.0.0.1:5000/team"),
        (["127.0.0.1:5000/other", "127.0.0.1:5000"], "127.0.0.1:5000"),
        (["127.0.0.1:5000/te", "127.0.0.1:5000/team/web/x", "127.0.0.1"], None),  # no prefix games
        (["127.0.0.1:5001", "127.0.0.2:5000"], None),  # another port, another host
        (["http://127.0.0.1:5000/v2/"], "http://127.0.0.1:5000/v2/"),  # legacy: host only
        (["127.0.0.1:5000/team/"], "127.0.0.1:5000/team/"),  # a trailing slash is harmless
        ([], None),
    ],
)
def test_the_most_specific_key_wins(keys: list[str], expected: str | None) -> None:
    assert match_auth_key(IMAGE, keys) == expected


def test_docker_hub_keys_in_any_spelling_match_hub_images() -> None:
    legacy = "https://index.docker.io/v1/"
    assert match_auth_key("busybox", [legacy]) == legacy
    assert match_auth_key("docker.io/library/busybox", ["registry-1.docker.io"]) is not None
    assert match_auth_key("busybox", [legacy, "docker.io"]) == "docker.io"  # exact beats legacy
    assert match_auth_key("busybox", ["docker.io/other"]) is None


def test_credentials_come_from_auth_or_from_username_and_password(tmp_path: Path) -> None:
    path = write_auth(
        tmp_path / "auth.json",
        {
            "127.0.0.1:5000": {"auth": b64("host-user:pa:ss")},  # only the first ':' splits
            "127.0.0.1:5000/team": {"username": "team-user", "password": "pw", "email": "x"},
        },
    )
    found = registry_credentials(IMAGE, path)
    assert found == RegistryCredentials("127.0.0.1:5000/team", "team-user", "pw")
    assert registry_credentials("127.0.0.1:5000/solo@sha256:" + "a" * 64, path) == (
        RegistryCredentials("127.0.0.1:5000", "host-user", "pa:ss")
    )
    assert registry_credentials("127.0.0.1:6000/x@sha256:" + "a" * 64, path) is None
    assert found is not None
    assert "pw" not in repr(found)
    assert found.auth_config() == {"username": "team-user", "password": "pw"}


def test_an_auth_file_without_auths_has_no_entries(tmp_path: Path) -> None:
    (tmp_path / "auth.json").write_text('{"credHelpers": {}}', encoding="utf-8")
    assert registry_credentials(IMAGE, tmp_path / "auth.json") is None


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot be read"),
        (b'{"auths": {"127.0.0.1:5000": ', "is not JSON"),
        (b"\xff\xfe", "is not UTF-8"),
        (b"[]", "is not a JSON object"),
        (b'{"auths": []}', '"auths" is not an object'),
        (b'{"auths": {"127.0.0.1:5000": "user:pw"}}', "is not an object"),
        (
            b'{"auths": {"127.0.0.1:5000": {"auth": "%%%not base64"}}}',
            "not base64 of user:password",
        ),
        (
            json.dumps({"auths": {"127.0.0.1:5000": {"auth": b64("no-colon")}}}).encode(),
            "not base64",
        ),
        (b'{"auths": {"127.0.0.1:5000": {"auth": 12}}}', "is not a string"),
        (b'{"auths": {"127.0.0.1:5000": {"username": "u"}}}', "has no"),
        (b'{"auths": {"127.0.0.1:5000": {}}}', "has no"),
    ],
)
def test_a_bad_auth_file_is_one_settings_line_naming_the_file(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    path = tmp_path / "auth.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError) as caught:
        registry_credentials(IMAGE, path)
    line = caught.value.one_line()
    assert says in line
    assert line.startswith(f"registry_auth_file {path}")
    assert "\n" not in str(caught.value)


def test_only_the_entry_that_applies_is_judged(tmp_path: Path) -> None:
    path = write_auth(
        tmp_path / "auth.json",
        {"127.0.0.1:5000": {"auth": "%%%"}, "127.0.0.1:5000/team/web": {"auth": b64("u:p")}},
    )
    assert registry_credentials(IMAGE, path) == RegistryCredentials(
        "127.0.0.1:5000/team/web", "u", "p"
    )


def test_a_secret_never_shows_in_an_error(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    path = tmp_path / "auth.json"
    path.write_text('{"auths": {"127.0.0.1:5000": {"auth": "' + secret + '!"}}', encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        registry_credentials(IMAGE, path)
    assert secret not in str(caught.value)


# ---- against a real Podman service and real registries --------------------------------------


def auth_file_for(
    tmp_path: Path, registry: AuthRegistry, *, password: str | None = None, key: str | None = None
) -> Path:
    user_pass = f"{registry.username}:{registry.password if password is None else password}"
    return write_auth(tmp_path / "auth.json", {key or registry.host: {"auth": b64(user_pass)}})


@pytest.mark.podman
def test_a_pull_with_the_right_credentials_works_and_without_them_fails(
    tmp_path: Path,
    auth_podman_clean: PodmanService,
    auth_registry: AuthRegistry,
    auth_images: dict[str, str],
) -> None:
    image = auth_images["web"]
    with PodmanEdge(auth_podman_clean.url) as edge, pytest.raises(RegistryError) as caught:
        edge.pull(image)  # the registry really wants credentials
    assert auth_registry.host in caught.value.one_line()

    auth = auth_file_for(tmp_path, auth_registry, key=f"{auth_registry.host}/reconciler")
    with PodmanEdge(auth_podman_clean.url, registry_auth_file=auth) as edge:
        image_id = edge.pull(image)
        assert edge.has_image(image)
    assert image_id


@pytest.mark.podman
def test_a_wrong_password_is_one_line_naming_the_registry_without_the_secret(
    tmp_path: Path,
    auth_podman_clean: PodmanService,
    auth_registry: AuthRegistry,
    auth_images: dict[str, str],
) -> None:
    wrong = "wrong-password-123"
    auth = auth_file_for(tmp_path, auth_registry, password=wrong)
    with PodmanEdge(auth_podman_clean.url, registry_auth_file=auth) as edge:
        with pytest.raises(RegistryError) as caught:
            edge.pull(auth_images["web"])
        assert not edge.has_image(auth_images["web"])
    line = caught.value.one_line()
    assert line == str(caught.value)
    assert f"credentials for {auth_registry.host} from {auth}" in line
    assert wrong not in line and auth_registry.password not in line
    assert b64(f"{auth_registry.username}:{wrong}") not in line


@pytest.mark.podman
def test_a_malformed_or_missing_auth_file_fails_the_pull_in_one_line(
    tmp_path: Path, auth_podman_clean: PodmanService, auth_images: dict[str, str]
) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text('{"auths": {', encoding="utf-8")
    for path, says in ((bad, "is not JSON"), (tmp_path / "missing.json", "cannot be read")):
        with (
            PodmanEdge(auth_podman_clean.url, registry_auth_file=path) as edge,
            pytest.raises(RegistryError) as caught,
        ):
            edge.pull(auth_images["web"])
        line = caught.value.one_line()
        assert line.startswith(f"pulling {auth_images['web']}: registry_auth_file {path}")
        assert says in line
        assert isinstance(caught.value.__cause__, SettingsError)


@pytest.mark.podman
def test_no_matching_entry_pulls_without_credentials(
    tmp_path: Path,
    auth_podman_clean: PodmanService,
    auth_registry: AuthRegistry,
    test_images: dict[str, str],
) -> None:
    plain = test_images["web"]  # from the plain registry, which wants no credentials
    # An entry for the other registry only, and a broken one that does not apply.
    auth = write_auth(
        tmp_path / "auth.json",
        {auth_registry.host: {"auth": b64(auth_registry.creds)}, "127.0.0.1:1/x": {"auth": "%"}},
    )
    with PodmanEdge(auth_podman_clean.url, registry_auth_file=auth) as edge:
        assert edge.pull(plain)
        assert edge.has_image(plain)


# ---- the node: a failed pull leaves it where it was ------------------------------------------


def _publish(simulator: RepositorySimulator, image: str) -> str:
    body = base_snapshot()
    body["models"] = []
    body["runtimes"] = [{"name": "web", "image": image, "health": HEALTHY}]
    return simulator.publish(None, body=body).digest


@pytest.mark.podman
def test_a_node_with_a_wrong_password_stays_on_what_it_runs_until_the_file_is_fixed(
    tmp_path: Path,
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    auth_podman_clean: PodmanService,
    auth_registry: AuthRegistry,
    auth_images: dict[str, str],
    test_images: dict[str, str],
) -> None:
    auth = tmp_path / "auth.json"
    env = node_env(auth_podman_clean, tmp_path / "hooks", RECONCILER_REGISTRY_AUTH_FILE=str(auth))
    auth_file_for(tmp_path, auth_registry, key="127.0.0.1:1")  # matches nothing here
    first = _publish(simulator, test_images["web"])
    node.run("once", env=env).ok()
    assert running(auth_podman_clean) == {"reconciler-web": first}

    second = _publish(simulator, auth_images["web2"])
    wrong = "not-the-password"
    auth_file_for(tmp_path, auth_registry, password=wrong)
    failed = node.run("once", env=env)
    assert failed.exit_code == 1, failed.stdout + failed.stderr
    line = failed.stdout.strip()
    assert "\n" not in line and "Traceback" not in failed.stdout + failed.stderr
    assert f"credentials for {auth_registry.host}" in line
    assert running(auth_podman_clean) == {"reconciler-web": first}
    status = node.status()
    assert status["quarantined"] == [] and status["converged"] is False
    assert auth_registry.host in status["last_error"]["message"]
    everything = failed.stdout + failed.stderr + json.dumps(status)
    assert wrong not in everything and b64(f"{auth_registry.username}:{wrong}") not in everything

    auth.write_text("{not json", encoding="utf-8")
    broken = node.run("once", env=env)
    assert broken.exit_code == 1, broken.stdout + broken.stderr
    assert f"registry_auth_file {auth} is not JSON" in broken.stdout.strip()
    assert "Traceback" not in broken.stdout + broken.stderr
    assert running(auth_podman_clean) == {"reconciler-web": first}

    auth_file_for(tmp_path, auth_registry)
    node.run("once", env=env).ok()
    assert running(auth_podman_clean) == {"reconciler-web": second}
    assert node.status()["last_error"] is None
