"""Credentials for model mirrors (setting ``mirror_auth_file``), and where they may go.

Where it sits: the apply step's model edge loads the file once per pass that downloads
(``load_mirror_auth``) and hands the resulting ``MirrorAuth`` to ``download.new_client``;
httpx then runs ``MirrorAuth.auth_flow`` for every request the download engine sends
(whole files, resumed files, every byte range), and ``MirrorAuth.guard`` for every request,
redirects included. ``refusal`` words a 401/403 for ``wire.status_text``.

The file has the containers-auth.json(5) shape the node already reads for registries:
``{"auths": {KEY: ENTRY}}``, KEY being ``host``, ``host:port`` or either followed by a path
prefix (``huggingface.co/org/repo``), ENTRY one of ``{"auth": base64("user:password")}``,
``{"username": …, "password": …}`` (HTTP basic) or ``{"token": …}`` (``Bearer``). The entry
whose host and port equal the request's and whose path prefix is the longest one that
contains the request's path wins.

Rules, each enforced here rather than left to httpx's defaults:

* credentials go only over ``https``, or over ``http`` to a loopback host (127.0.0.0/8,
  ``::1``, ``localhost``), and only to the exact host and port of their entry (no port in a
  key means the scheme's default);
* they go on the request the download engine made and on redirects within its origin
  (scheme, host and port: a hub's renamed repository), never after a redirect that leaves
  it: httpx drops ``Authorization`` then, except on an ``http`` → ``https`` upgrade of the
  same host, so ``guard`` strips it from any request whose origin is not the one it was
  added for;
* a URL's own ``user:password@`` is used as basic credentials under the same rules, when
  no entry of the file matches.

What it may not do: put a secret into a message, a ``repr``, a log line or an exception;
read any file but the one named; decide what a failed download means (``download`` does).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from reconciler.core.errors import SettingsError
from reconciler.disk.credentials import credentials_json, read_credentials

__all__ = [
    "MirrorAuth",
    "MirrorCredential",
    "is_loopback",
    "load_mirror_auth",
    "parse_mirror_auth",
    "refusal",
]

_FILE_LIMIT = 1 << 20  # bytes: an auth file is a few hundred
_NOTE = "reconciler.mirror_auth"  # request extension: what the auth flow decided, never sent
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class MirrorCredential:
    """One entry of the file; ``repr`` shows the key and the kind, never the secret."""

    key: str  # as written in the file
    host: str  # lower case, an IPv6 address without brackets
    port: int | None  # None: the default port of the request's scheme
    path: str  # "" or a prefix like "/org/repo" (no trailing slash)
    kind: str  # "basic" or "bearer"
    header: str = field(repr=False)  # the Authorization value

    def covers(self, url: httpx.URL) -> bool:
        if url.host.lower() != self.host or _port(url) != (self.port or _default_port(url)):
            return False
        if not self.path:
            return True
        path = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
        return path == self.path or path.startswith(self.path + "/")


@dataclass(frozen=True)
class _Note:
    """What the auth flow decided for the request the download engine made."""

    origin: tuple[str, str, int]
    source: str | None  # the file, as ``MirrorAuth.source``
    key: str | None  # the entry that matched (or "the URL's user:password"), None if none
    sent: bool
    withheld: str | None = None  # why a matching entry was not sent


class MirrorAuth(httpx.Auth):
    """The credentials of one ``mirror_auth_file`` (possibly none), as an httpx auth."""

    def __init__(self, entries: Iterable[MirrorCredential], *, source: str | None) -> None:
        # Longest path prefix first: the first entry that covers a URL is the most specific.
        self.entries = tuple(sorted(entries, key=lambda e: -len(e.path)))
        self.source = source  # "mirror_auth_file <path>", or None when the setting is unset

    def __repr__(self) -> str:
        return f"MirrorAuth({len(self.entries)} entries from {self.source or 'no file'})"

    def match(self, url: httpx.URL) -> MirrorCredential | None:
        """The most specific entry for ``url``, whether or not it may be sent there."""
        return next((e for e in self.entries if e.covers(url)), None)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        note = self._decide(request)
        request.extensions = {**request.extensions, _NOTE: note}
        yield request

    def guard(self, request: httpx.Request) -> None:
        """Event hook for every request httpx sends: ``Authorization`` only to the origin
        the auth flow added it for (redirects copy headers and extensions)."""
        note = request.extensions.get(_NOTE)
        if "Authorization" in request.headers and (
            not isinstance(note, _Note) or not note.sent or note.origin != _origin(request.url)
        ):
            del request.headers["Authorization"]

    def _decide(self, request: httpx.Request) -> _Note:
        url = request.url
        entry = self.match(url)
        if entry is not None:
            key, header = entry.key, entry.header
        elif url.username or url.password:
            key = "the URL's user:password"
            header = _basic(url.username, url.password)
        else:
            return _Note(origin=_origin(url), source=self.source, key=None, sent=False)
        why_not = _unsafe(url)
        if why_not is not None:
            return _Note(
                origin=_origin(url), source=self.source, key=key, sent=False, withheld=why_not
            )
        request.headers["Authorization"] = header
        return _Note(origin=_origin(url), source=self.source, key=key, sent=True)


def refusal(response: httpx.Response) -> str:
    """One line for a 401 or 403: the host that answered and whether credentials were
    missing (no entry, or one that could not be sent there) or refused (one was sent)."""
    request = response.request
    where = _hostport(request.url)
    head = f"HTTP {response.status_code} from {where}"
    note = request.extensions.get(_NOTE)
    if "Authorization" in request.headers:
        named = note.key if isinstance(note, _Note) and note.key else "credentials"
        return f"{head}: credentials refused (entry {named!r} was sent)"
    if isinstance(note, _Note) and note.key is not None:
        if note.origin != _origin(request.url):
            return f"{head}: credentials missing (entry {note.key!r} is not sent after a redirect)"
        return f"{head}: credentials missing (entry {note.key!r} withheld: {note.withheld})"
    if isinstance(note, _Note) and note.origin != _origin(request.url):
        return f"{head}: credentials missing (redirected there; entries never follow a redirect)"
    if isinstance(note, _Note) and note.source is not None:
        return f"{head}: credentials missing (no entry for {where} in {note.source})"
    return f"{head}: credentials missing (no mirror_auth_file is set)"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: hosts where plain HTTP never leaves the machine."""
    name = host.lower().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def load_mirror_auth(path: str | Path | None) -> MirrorAuth:
    """The credentials of ``mirror_auth_file`` (none when the setting is unset).

    The one place the file is read (each pass that downloads reads it again, so an edit
    takes effect at the next pass). Raises ``SettingsError``, one line naming the file and,
    for a bad entry, its key; never a value.
    """
    if path is None or str(path) == "":
        return MirrorAuth((), source=None)
    where = f"mirror_auth_file {path}"
    raw = read_credentials(Path(path), setting="mirror_auth_file", limit=_FILE_LIMIT, private=True)
    return MirrorAuth(parse_mirror_auth(raw, where=where), source=where)


def parse_mirror_auth(raw: bytes, *, where: str) -> list[MirrorCredential]:
    """The entries of a file's bytes; ``SettingsError`` (starting with ``where``) if any
    entry is unusable: a file half understood would send some requests without the
    credentials the operator meant them to carry."""
    document = credentials_json(raw, where=where)
    if not isinstance(document, dict) or not isinstance(document.get("auths"), dict):
        raise SettingsError(f'{where} is not an object with an "auths" object')
    entries = [_entry(key, value, where=where) for key, value in document["auths"].items()]
    seen: set[tuple[str, int | None, str]] = set()
    for entry in entries:
        scope = (entry.host, entry.port, entry.path)
        if scope in seen:
            raise SettingsError(f"{where}: two entries for the same scope as {entry.key!r}")
        seen.add(scope)
    return entries


def _entry(key: Any, value: Any, *, where: str) -> MirrorCredential:
    host, port, path = _scope(key, where=where)
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: the entry for {key!r} is not an object")
    kind, header = _header(key, value, where=where)
    return MirrorCredential(key=key, host=host, port=port, path=path, kind=kind, header=header)


def _scope(key: str, *, where: str) -> tuple[str, int | None, str]:
    """(host, port, path prefix) of a key ``host[:port][/path]``."""
    if "://" in key or not key or any(c in key for c in "?#@ \t"):
        raise SettingsError(
            f"{where}: key {key!r} is not host[:port][/path] (no scheme, query or user)"
        )
    authority, slash, path = key.partition("/")
    try:
        # Not httpx.URL: it forgets a port that is the default of the scheme it is given.
        parsed = urlsplit(f"//{authority}")
        host, port = parsed.hostname or "", parsed.port
    except ValueError:
        raise SettingsError(f"{where}: key {key!r} has no valid host[:port]") from None
    if not host:
        raise SettingsError(f"{where}: key {key!r} has no host")
    prefix = ("/" + path).rstrip("/") if slash else ""
    return host, port, prefix


def _header(key: str, value: dict[str, Any], *, where: str) -> tuple[str, str]:
    """("basic" or "bearer", the Authorization value) of one entry; messages name the key."""
    token, auth = value.get("token"), value.get("auth")
    username, password = value.get("username"), value.get("password")
    given = [name for name in ("token", "auth", "username") if value.get(name) is not None]
    if len(given) != 1:
        raise SettingsError(
            f'{where}: the entry for {key!r} needs exactly one of "token", "auth" or '
            f'"username" and "password"'
        )
    if token is not None:
        if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
            raise SettingsError(f'{where}: "token" of {key!r} is not printable ASCII')
        return "bearer", f"Bearer {token}"
    if auth is not None:
        user, secret = _decode_auth(auth, key=key, where=where)
        return "basic", _basic(user, secret)
    if not (isinstance(username, str) and username and ":" not in username) or not isinstance(
        password, str
    ):
        raise SettingsError(f'{where}: the entry for {key!r} needs "username" and "password"')
    return "basic", _basic(username, password)


def _decode_auth(auth: Any, *, key: str, where: str) -> tuple[str, str]:
    decoded = ""
    if isinstance(auth, str):
        try:
            decoded = base64.b64decode(auth.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            decoded = ""
    user, sep, secret = decoded.partition(":")
    if not sep or not user:
        raise SettingsError(f'{where}: "auth" of {key!r} is not base64 of user:password')
    return user, secret


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _unsafe(url: httpx.URL) -> str | None:
    """Why credentials may not travel on this URL, or None."""
    if url.scheme == "https":
        return None
    if url.scheme == "http" and is_loopback(url.host):
        return None
    return f"only sent over https or to a loopback host, not over {url.scheme}"


def _default_port(url: httpx.URL) -> int | None:
    return _DEFAULT_PORTS.get(url.scheme)


def _port(url: httpx.URL) -> int | None:
    return url.port or _default_port(url)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host.lower(), _port(url) or 0


def _hostport(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port else host
