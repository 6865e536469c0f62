"""Setting ``mirror_auth_file``: credentials for model mirrors, sent only where they belong.

Real servers on 127.0.0.1: nginx behind ``auth_basic``; a token gate standing in for a model
hub that answers an authorised request with a redirect to a CDN on another port (a
``FileServer`` that records the headers it got); plain ``FileServer`` mirrors without
credentials. Downloads run through the real download engine (one stream, segments, resume)
and, for the operator's view, through ``reconcile once`` against a private Podman service.

After every test the ``no_leaks`` fixture greps everything the test left under its tmp_path
(the state folder included; the secrets folder, which holds the auth file and the servers'
password files, excepted), every log line and command output the test collected, and
``reconcile status --json`` of every node it ran, for each secret: none may appear.

Two tests use httpx's ``MockTransport``, each saying why: an ``http`` → ``https`` upgrade of
the same host needs ports 80 and 443 with a trusted certificate, and a non-loopback host
needs another machine; the decision under test is the client's, not the server's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pygit2
import pytest

from bench.nginx_origin import NginxOrigin
from reconciler.core.errors import DownloadError, HashMismatchError, SettingsError
from reconciler.models.download import download_file, new_client
from reconciler.models.limits import DownloadLimits
from reconciler.models.mirror_auth import MirrorAuth, is_loopback, load_mirror_auth
from reconciler.models.partial import record_path
from reconciler.models.wire import describe, redact
from tests.support.auth_mirrors import TokenGate, start_basic_nginx
from tests.support.fileserver import Fault, FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import RepositorySimulator, base_snapshot

TOKEN = "hf_tok3n-Gated-0123456789abcdef"
WRONG_TOKEN = "hf_wr0ng-Token-fedcba9876543210"
USER = "mirror-reader"
PASSWORD = "pa55-Word-for-the-cache"
SIGNATURE = "Sig-9f8e7d6c5b4a39281706"  # the CDN's presigned query carries it
SECRETS = (
    TOKEN,
    WRONG_TOKEN,
    PASSWORD,
    base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    SIGNATURE,
)
MIB = 1024 * 1024
SEGMENTED = DownloadLimits(
    min_split_bytes=256 * 1024, piece_bytes=512 * 1024, stall_s=1.0, connections_per_file=4
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


class Leaks:
    """What a test showed or left behind, checked for secrets when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.secrets_dir = tmp_path / "secrets"
        self.secrets_dir.mkdir()
        self.texts: list[str] = []
        self.nodes: list[NodeUnderTest] = []

    def auth_file(self, auths: dict[str, Any], *, mode: int = 0o600) -> Path:
        path = self.secrets_dir / "mirror-auth.json"
        path.write_text(json.dumps({"auths": auths}), encoding="utf-8")
        path.chmod(mode)
        return path

    def saw(self, text: str) -> str:
        self.texts.append(text)
        return text

    def run(self, node: NodeUnderTest, *args: str, **env: str) -> Outcome:
        if node not in self.nodes:
            self.nodes.append(node)
        outcome = node.run(*args, env=env)
        self.saw(outcome.stdout + outcome.stderr)
        return outcome

    def check(self, captured: str) -> None:
        places = {"captured output and logs": captured, "messages": "\n".join(self.texts)}
        for node in self.nodes:
            places[f"status --json of {node.home.name}"] = node.run("status", "--json").stdout
            # Commits, notes (receipts) and trees are zlib-compressed on disk: read them.
            odb = pygit2.Repository(str(node.repo)).odb
            objects = b"\n".join(odb.read(oid)[1] for oid in odb)
            places[f"git objects of {node.home.name}"] = objects.decode("latin-1")
        for path in sorted(self.tmp_path.rglob("*")):
            if path.is_file() and not path.is_relative_to(self.secrets_dir):
                places[str(path)] = path.read_bytes().decode("latin-1")
        for where, text in places.items():
            for secret in SECRETS:
                assert secret not in text, f"a secret leaked into {where}"


@pytest.fixture(autouse=True)
def no_leaks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Iterator[Leaks]:
    leaks = Leaks(tmp_path)
    yield leaks
    out, err = capfd.readouterr()
    leaks.check(out + err + caplog.text)


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[FileServer]:
    with FileServer(tmp_path / "cdn") as server:
        yield server


@pytest.fixture
def gate(cdn: FileServer) -> Iterator[TokenGate]:
    with TokenGate(token=TOKEN, cdn=cdn.url, query=f"X-Amz-Signature={SIGNATURE}") as server:
        yield server


@pytest.fixture
def basic_nginx(tmp_path: Path, no_leaks: Leaks) -> Iterator[NginxOrigin]:
    origin = start_basic_nginx(
        tmp_path / "www", no_leaks.secrets_dir / "nginx", user=USER, password=PASSWORD
    )
    if origin is None:
        pytest.skip("nginx is not installed (.ci/setup installs nginx-light)")
    yield origin
    origin.close()


def fetch(
    auth: MirrorAuth,
    data: bytes,
    dest: Path,
    *urls: str,
    limits: DownloadLimits | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    with new_client(auth=auth) as client:
        download_file(
            client,
            urls=list(urls),
            base_url=None,
            dest_partial=dest,
            size=len(data),
            digest=sha256(data),
            progress=None,
            deadline_s=30.0,
            label="gated:v1/model.bin",
            limits=limits,
            should_stop=should_stop,
        )


def authorizations(headers: list[dict[str, str]]) -> list[str | None]:
    return [h.get("authorization") for h in headers]


# --------------------------------------------------------------- the file and its matching


def test_the_most_specific_entry_wins_by_exact_host_port_and_whole_path_segments(
    no_leaks: Leaks,
) -> None:
    auth = load_mirror_auth(
        no_leaks.auth_file(
            {
                "hub.example": {"token": "host-wide"},
                "hub.example/org": {"token": "org"},
                "hub.example/org/repo/": {"auth": basic("u", "p")},
                "hub.example:8443": {"username": "other", "password": "port"},
                "[::1]:9000/m": {"token": "v6"},
            }
        )
    )

    def key(url: str) -> str | None:
        entry = auth.match(httpx.URL(url))
        return entry.key if entry else None

    assert key("https://hub.example/org/repo/resolve/main/x.bin") == "hub.example/org/repo/"
    assert key("https://hub.example/org/repo") == "hub.example/org/repo/"
    assert key("https://hub.example/org/repository/x") == "hub.example/org"  # not a prefix
    assert key("https://hub.example/org") == "hub.example/org"
    assert key("https://HUB.example/elsewhere") == "hub.example"
    assert key("https://hub.example:443/elsewhere") == "hub.example"  # the default port
    assert key("https://hub.example:8443/org/x") == "hub.example:8443"
    assert key("https://hub.example:8080/org/x") is None  # another port
    assert key("https://cdn.hub.example/org/x") is None  # another host, even a subdomain
    assert key("http://[::1]:9000/m/a") == "[::1]:9000/m"
    assert key("http://[::1]:9000/mm") is None
    assert "host-wide" not in repr(auth) and "host-wide" not in repr(auth.entries)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{not json", "is not JSON"),
        (b'{"auths": []}', 'is not an object with an "auths" object'),
        (b'{"auths": {"https://hub.example": {"token": "t"}}}', "key 'https://hub.example'"),
        (b'{"auths": {"hub.example:http": {"token": "t"}}}', "key 'hub.example:http'"),
        (b'{"auths": {"hub.example": {"token": "t", "auth": "dTpw"}}}', "exactly one of"),
        (b'{"auths": {"hub.example": {}}}', "exactly one of"),
        (b'{"auths": {"hub.example": {"auth": "pa55-Word-for-the-cache"}}}', "not base64"),
        (b'{"auths": {"hub.example": {"token": "two words"}}}', "not printable ASCII"),
        (b'{"auths": {"hub.example": {"username": "u"}}}', 'needs "username" and "password"'),
        (
            b'{"auths": {"hub.example/a": {"token": "t"}, "HUB.example/a/": {"token": "u"}}}',
            "two entries for the same scope",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key_never_a_value(
    no_leaks: Leaks, raw: bytes, says: str
) -> None:
    path = no_leaks.secrets_dir / "bad.json"
    path.write_bytes(raw)
    path.chmod(0o600)

    with pytest.raises(SettingsError) as caught:
        load_mirror_auth(path)

    line = no_leaks.saw(caught.value.one_line())
    assert line.startswith(f"mirror_auth_file {path}"), line
    assert says in line, line
    assert "\n" not in line


def test_a_missing_file_names_itself_and_no_setting_means_no_credentials(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"mirror_auth_file .* cannot be read"):
        load_mirror_auth(tmp_path / "absent.json")
    assert load_mirror_auth(None).entries == ()


def _decided(auth: MirrorAuth, url: str) -> httpx.Request:
    """The request as the auth flow leaves it (no network: the flow decides alone)."""
    return next(auth.sync_auth_flow(httpx.Request("GET", url)))


def test_credentials_travel_only_over_https_or_to_a_loopback_host(no_leaks: Leaks) -> None:
    auth = load_mirror_auth(
        no_leaks.auth_file(
            {
                "hub.example": {"token": TOKEN},
                "127.0.0.1:8080": {"token": TOKEN},
                "localhost:8080": {"token": TOKEN},
                "[::1]:8080": {"token": TOKEN},
            }
        )
    )
    sent = f"Bearer {TOKEN}"
    assert _decided(auth, "https://hub.example/x").headers.get("authorization") == sent
    assert "authorization" not in _decided(auth, "http://hub.example/x").headers
    for loopback in ("http://127.0.0.1:8080/x", "http://localhost:8080/x", "http://[::1]:8080/x"):
        assert _decided(auth, loopback).headers.get("authorization") == sent, loopback
    assert [is_loopback(h) for h in ("127.8.9.10", "::1", "LOCALHOST", "10.0.0.1")] == [
        True,
        True,
        True,
        False,
    ]
    # A URL's own user:password is sent under the same rules, and never over plain http.
    with_userinfo = f"https://{USER}:{PASSWORD}@cache.example/x"
    header = _decided(auth, with_userinfo).headers.get("authorization")
    assert header == f"Basic {basic(USER, PASSWORD)}"
    assert "authorization" not in _decided(auth, with_userinfo.replace("https", "http")).headers


def test_an_http_to_https_upgrade_of_the_same_host_does_not_carry_the_credentials(
    no_leaks: Leaks,
) -> None:
    # MockTransport: httpx keeps Authorization on exactly this redirect (port 80 to 443 of
    # one host), which a loopback test cannot reach without privileged ports and a
    # certificate the client trusts; what is checked is what the client sends.
    auth = load_mirror_auth(no_leaks.auth_file({"localhost": {"token": TOKEN}}))
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path == "/m.bin" and request.url.scheme == "http":
            return httpx.Response(302, headers={"Location": "/renamed.bin"})  # same origin
        if request.url.scheme == "http":
            return httpx.Response(302, headers={"Location": "https://localhost/m.bin"})
        return httpx.Response(200, content=b"ok")

    # The client new_client makes, on the fake transport.
    with httpx.Client(
        auth=auth,
        event_hooks={"request": [auth.guard]},
        follow_redirects=True,
        transport=httpx.MockTransport(answer),
    ) as client:
        response = client.get("http://localhost/m.bin")

    assert response.status_code == 200
    assert seen == [
        ("http://localhost/m.bin", f"Bearer {TOKEN}"),
        ("http://localhost/renamed.bin", f"Bearer {TOKEN}"),  # a hub renaming a repository
        ("https://localhost/m.bin", None),
    ]


def test_redact_and_describe_drop_userinfo_and_query_tokens() -> None:
    assert (
        redact(f"https://{USER}:{PASSWORD}@cache.example:8443/m/a.bin?token={TOKEN}#f")
        == "https://cache.example:8443/m/a.bin"
    )
    signed = f"https://bucket.s3.example/a.bin?X-Amz-Signature={SIGNATURE}&sig={SIGNATURE}"
    assert redact(signed) == "https://bucket.s3.example/a.bin"
    assert redact("http://[::1]:9000/a.bin?sig=x") == "http://[::1]:9000/a.bin"
    text = describe(httpx.InvalidURL(f"bad redirect to {signed} and http://u:{PASSWORD}@h/x"))
    assert SIGNATURE not in text and PASSWORD not in text
    assert "https://bucket.s3.example/a.bin" in text


# --------------------------------------------------------------- real servers, real downloads


def test_nginx_basic_auth_serves_with_the_entry_and_says_missing_or_refused_without(
    basic_nginx: NginxOrigin, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    (basic_nginx.root / "m").mkdir()
    (basic_nginx.root / "m" / "a.bin").write_bytes(data)
    url = basic_nginx.url + "m/a.bin"
    host = f"127.0.0.1:{basic_nginx.port}"

    nothing = load_mirror_auth(no_leaks.auth_file({"127.0.0.1:1": {"token": TOKEN}}))
    with pytest.raises(DownloadError) as missing:
        fetch(nothing, data, tmp_path / "p1", url)
    wrong = load_mirror_auth(no_leaks.auth_file({host: {"auth": basic(USER, "not-it")}}))
    with pytest.raises(DownloadError) as refused:
        fetch(wrong, data, tmp_path / "p2", url)
    right = load_mirror_auth(no_leaks.auth_file({f"{host}/m": {"auth": basic(USER, PASSWORD)}}))
    fetch(right, data, tmp_path / "p3", url)

    for caught in (missing, refused):
        assert not isinstance(caught.value, HashMismatchError)
    assert no_leaks.saw(missing.value.one_line()).endswith(
        f"{url}: HTTP 401 from {host}: credentials missing (no entry for {host} in "
        f"mirror_auth_file {no_leaks.secrets_dir / 'mirror-auth.json'})"
    )
    assert no_leaks.saw(refused.value.one_line()).endswith(
        f"{url}: HTTP 401 from {host}: credentials refused (entry {host!r} was sent)"
    )
    assert (tmp_path / "p3").read_bytes() == data
    assert [status for status, _sent, _range in basic_nginx.requests()] == [401, 401, 200]


def test_the_token_reaches_the_hub_but_never_the_cdn_it_redirects_to(
    gate: TokenGate, cdn: FileServer, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    cdn.write("org/repo/model.bin", data)
    auth = load_mirror_auth(no_leaks.auth_file({f"127.0.0.1:{gate.port}/org": {"token": TOKEN}}))

    fetch(auth, data, tmp_path / "p", gate.url + "org/repo/model.bin")

    assert (tmp_path / "p").read_bytes() == data
    assert authorizations([h for _p, h in gate.seen]) == [f"Bearer {TOKEN}"]
    at_cdn = cdn.stats.headers("/org/repo/model.bin")
    assert len(at_cdn) == 1 and authorizations(at_cdn) == [None], at_cdn


def test_a_cdn_refusal_after_the_redirect_names_the_cdn_and_says_the_entry_stayed_behind(
    gate: TokenGate, cdn: FileServer, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    cdn.write("org/m.bin", data)
    cdn.faults.set("/org/m.bin", Fault(status=403))
    key = f"127.0.0.1:{gate.port}"
    auth = load_mirror_auth(no_leaks.auth_file({key: {"token": TOKEN}}))

    with pytest.raises(DownloadError) as caught:
        fetch(auth, data, tmp_path / "p", gate.url + "org/m.bin")

    line = no_leaks.saw(caught.value.one_line())
    assert line.endswith(
        f"HTTP 403 from 127.0.0.1:{cdn.port}: credentials missing "
        f"(entry {key!r} is not sent after a redirect)"
    ), line
    assert authorizations(cdn.stats.headers("/org/m.bin")) == [None]


def test_a_wrong_token_is_refused_in_one_line_and_the_next_mirror_without_credentials_is_used(
    gate: TokenGate, cdn: FileServer, file_server: FileServer, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(120_000)
    cdn.write("org/m.bin", data)
    file_server.write("plain/m.bin", data)
    key = f"127.0.0.1:{gate.port}"
    auth = load_mirror_auth(no_leaks.auth_file({key: {"token": WRONG_TOKEN}}))

    with pytest.raises(DownloadError) as alone:
        fetch(auth, data, tmp_path / "alone", gate.url + "org/m.bin")
    fetch(auth, data, tmp_path / "p", gate.url + "org/m.bin", file_server.url_for("plain/m.bin"))

    line = no_leaks.saw(alone.value.one_line())
    assert not isinstance(alone.value, HashMismatchError)
    assert line.endswith(f"HTTP 401 from {key}: credentials refused (entry {key!r} was sent)")
    assert not (tmp_path / "alone").exists() or (tmp_path / "alone").stat().st_size == 0
    assert (tmp_path / "p").read_bytes() == data
    assert authorizations(file_server.stats.headers("/plain/m.bin")) == [None]
    assert cdn.stats.requests("/org/m.bin") == 0


def test_an_entry_for_another_host_or_port_sends_nothing(
    gate: TokenGate, cdn: FileServer, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    cdn.write("org/m.bin", data)
    path = no_leaks.auth_file(
        {f"localhost:{gate.port}": {"token": TOKEN}, f"127.0.0.1:{cdn.port}": {"token": TOKEN}}
    )

    with pytest.raises(DownloadError) as caught:
        fetch(load_mirror_auth(path), data, tmp_path / "p", gate.url + "org/m.bin")

    assert authorizations([h for _p, h in gate.seen]) == [None]
    assert no_leaks.saw(caught.value.one_line()).endswith(
        f"HTTP 401 from 127.0.0.1:{gate.port}: credentials missing "
        f"(no entry for 127.0.0.1:{gate.port} in mirror_auth_file {path})"
    )


def test_segments_and_a_resume_send_the_token_on_every_request_beside_a_plain_mirror(
    gate: TokenGate,
    cdn: FileServer,
    file_server: FileServer,
    basic_nginx: NginxOrigin,
    no_leaks: Leaks,
    tmp_path: Path,
) -> None:
    data = os.urandom(8 * MIB + 4321)
    cdn.write("org/big.bin", data)
    file_server.write("plain/big.bin", data)
    (basic_nginx.root / "big.bin").write_bytes(data)
    auth = load_mirror_auth(
        no_leaks.auth_file(
            {
                f"127.0.0.1:{gate.port}": {"token": TOKEN},
                f"127.0.0.1:{basic_nginx.port}": {"auth": basic(USER, PASSWORD)},
            }
        )
    )
    urls = (gate.url + "org/big.bin", file_server.url_for("plain/big.bin"))
    partial = tmp_path / "partial" / "big"
    # Every request of the first attempt stalls after 100 kB, so it cannot finish before
    # it is stopped; the resume gets the servers back in order.
    for server, path in ((cdn, "/org/big.bin"), (file_server, "/plain/big.bin")):
        server.faults.set(path, Fault(stall_after=100_000))

    def some_arrived() -> bool:
        return cdn.stats.total_body_bytes() + file_server.stats.total_body_bytes() >= 200_000

    with pytest.raises(DownloadError, match="cancelled"):
        fetch(auth, data, partial, *urls, limits=SEGMENTED, should_stop=some_arrived)
    cdn.faults.clear()
    file_server.faults.clear()
    assert record_path(partial).exists()
    first_round = len(gate.seen)
    # The resume also has the basic-auth cache: two mirrors with credentials at once.
    fetch(auth, data, partial, *urls, basic_nginx.url + "big.bin", limits=SEGMENTED)

    assert partial.read_bytes() == data
    at_gate = [h for _p, h in gate.seen]
    assert first_round >= 1 and len(at_gate) > first_round  # the resume asked the hub again
    assert authorizations(at_gate) == [f"Bearer {TOKEN}"] * len(at_gate)
    assert all("range" in h for h in at_gate)
    at_cdn = cdn.stats.headers("/org/big.bin")
    assert len(at_cdn) == len(at_gate) and authorizations(at_cdn) == [None] * len(at_cdn)
    plain = file_server.stats.headers("/plain/big.bin")
    assert plain and authorizations(plain) == [None] * len(plain)  # the plain mirror was used
    at_cache = [status for status, _sent, _range in basic_nginx.requests()]
    assert at_cache and set(at_cache) == {206}, at_cache  # every range let in


def test_local_mirrors_take_entries_like_any_mirror_and_file_mirrors_need_none(
    basic_nginx: NginxOrigin, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(40_000)
    blob = basic_nginx.root / "lan" / "blobs" / "sha256" / sha256(data).removeprefix("sha256:")
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    local = DownloadLimits(local_mirrors=(basic_nginx.url + "lan",))
    cache = f"127.0.0.1:{basic_nginx.port}/lan"
    auth = load_mirror_auth(no_leaks.auth_file({cache: {"auth": basic(USER, PASSWORD)}}))

    fetch(auth, data, tmp_path / "from-lan", "http://127.0.0.1:1/unreachable", limits=local)
    fetch(auth, data, tmp_path / "from-file", blob.as_uri())

    assert (tmp_path / "from-lan").read_bytes() == data
    assert (tmp_path / "from-file").read_bytes() == data
    assert [status for status, _sent, _range in basic_nginx.requests()] == [200]


# --------------------------------------------------------------- the operator's view


def _gated_model(basic_nginx: NginxOrigin, cdn: FileServer, gate: TokenGate) -> dict[str, Any]:
    """A model with one file on the hub (token, CDN behind it) and one on a basic-auth
    cache; both URLs absolute, as a snapshot names third-party mirrors."""
    files = {"config.json": b'{"gated": true}\n', "weights.bin": os.urandom(700_000)}
    cdn.write("org/tiny/config.json", files["config.json"])
    (basic_nginx.root / "cache").mkdir()
    (basic_nginx.root / "cache" / "weights.bin").write_bytes(files["weights.bin"])
    urls = {
        "config.json": gate.url + "org/tiny/config.json",
        "weights.bin": basic_nginx.url + "cache/weights.bin",
    }
    return {
        "name": "tiny",
        "version": "v1",
        "files": [
            {"path": p, "size": len(d), "digest": sha256(d), "urls": [urls[p]]}
            for p, d in files.items()
        ],
        "bytes": files,
    }


@pytest.mark.podman
def test_once_installs_a_gated_model_once_the_operator_adds_the_entries(
    basic_nginx: NginxOrigin,
    gate: TokenGate,
    cdn: FileServer,
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    no_leaks: Leaks,
    tmp_path: Path,
) -> None:
    model = _gated_model(basic_nginx, cdn, gate)
    files = model.pop("bytes")
    snapshot = base_snapshot()
    snapshot["models"] = [model]
    simulator.publish(body=snapshot)
    auth_path = no_leaks.secrets_dir / "mirror-auth.json"
    env = {
        "RECONCILER_PODMAN_URL": podman_clean.url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(tmp_path / "no-hooks"),
        "RECONCILER_MIRROR_AUTH_FILE": str(auth_path),
    }

    auth_path.write_text("{", encoding="utf-8")
    auth_path.chmod(0o600)
    broken = no_leaks.run(node, "once", **env)
    no_leaks.auth_file({"127.0.0.1:1": {"token": TOKEN}})
    missing = no_leaks.run(node, "once", **env)
    status_missing = node.status()
    no_leaks.auth_file(
        {
            f"127.0.0.1:{gate.port}/org": {"token": TOKEN},
            f"127.0.0.1:{basic_nginx.port}/cache": {"username": USER, "password": PASSWORD},
        }
    )
    done = no_leaks.run(node, "once", **env)

    assert broken.exit_code == 1 and missing.exit_code == 1
    assert (
        broken.stdout.splitlines() == [broken.stdout.strip()]
        and f"model downloads: mirror_auth_file {auth_path} is not JSON" in broken.stdout
    )
    (line,) = missing.stdout.splitlines()
    assert "credentials missing (no entry for 127.0.0.1:" in line, line
    assert "failed verification" not in line
    (shown,) = [m for m in status_missing["models"] if m["id"] == "tiny:v1"]
    assert shown["state"] == "Pending" and "credentials missing" in shown["reason"], shown
    assert "credentials missing" in status_missing["last_error"]["message"]
    assert status_missing["quarantined"] == [] and not status_missing["converged"]
    assert done.exit_code == 0 and "converged on serial" in done.stdout, done.stdout
    tree = node.state_dir / "models" / "tiny" / "v1"
    assert {p: (tree / p).read_bytes() for p in files} == files
    status = node.status()
    assert status["converged"] and status["last_error"] is None
    assert authorizations(cdn.stats.headers("/org/tiny/config.json")) == [None]
    assert [s for s, _b, _r in basic_nginx.requests()][-1] == 200


# Strict modes (reconciler.disk.strict) guard this file as they guard the settings file, and
# a file of secrets must not be readable by others either.
@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606], ids=["0644", "0660", "0606"])
def test_an_auth_file_others_may_read_or_write_is_refused_before_anything_is_sent(
    gate: TokenGate, cdn: FileServer, no_leaks: Leaks, tmp_path: Path, mode: int
) -> None:
    data = os.urandom(10_000)
    cdn.write("org/m.bin", data)
    path = no_leaks.auth_file({f"127.0.0.1:{gate.port}": {"token": TOKEN}}, mode=mode)

    with pytest.raises(SettingsError) as caught:
        fetch(load_mirror_auth(path), data, tmp_path / "p", gate.url + "org/m.bin")

    line = no_leaks.saw(caught.value.one_line())
    assert line.startswith(f"mirror_auth_file {path}") or str(path) in line, line
    assert gate.seen == [] and not (tmp_path / "p").exists()


def test_a_refusing_mirror_is_not_asked_again_for_the_file_while_another_makes_progress(
    gate: TokenGate, file_server: FileServer, no_leaks: Leaks, tmp_path: Path
) -> None:
    data = os.urandom(600_000)
    file_server.write("plain/m.bin", data)
    # The plain mirror cuts its first answer: one more round over the mirrors is needed.
    file_server.faults.set("/plain/m.bin", Fault(cut_after=250_000, times=1))
    auth = load_mirror_auth(no_leaks.auth_file({f"127.0.0.1:{gate.port}": {"token": WRONG_TOKEN}}))

    fetch(auth, data, tmp_path / "p", gate.url + "org/m.bin", file_server.url_for("plain/m.bin"))

    assert (tmp_path / "p").read_bytes() == data
    assert file_server.stats.requests("/plain/m.bin") == 2
    assert len(gate.seen) == 1
