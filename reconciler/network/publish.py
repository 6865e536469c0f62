"""The network's side: make roots, sign envelopes, publish snapshots into an origin folder.

Edge module (files). The origin is a tree of static files, so publishing is writing files:
``snapshots/<hex>.json`` first (immutable, named by content), ``head.json`` last (the only
mutable file), each replaced atomically so a web server never serves half a document.
Everything published is checked against the same schemas and rules the nodes apply, so a
publisher cannot sign what every node would reject.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nacl.signing import SigningKey

from reconciler.core.documents import (
    Head,
    JsonError,
    Root,
    Snapshot,
    digest_of,
    format_time,
    loads_strict,
)
from reconciler.core.envelope import (
    HEAD_TYPE,
    ROOT_TYPE,
    SNAPSHOT_TYPE,
    EnvelopeError,
    parse_envelope,
    seal,
)
from reconciler.core.errors import SettingsError
from reconciler.core.rollout import Rollout
from reconciler.core.schema import SchemaError, SchemaName, validate
from reconciler.disk.atomic import write_atomic

__all__ = [
    "ChunksFilled",
    "Published",
    "RolloutRevision",
    "canonical_json",
    "fill_model_files",
    "make_root",
    "parse_duration",
    "parse_size",
    "piece_digests",
    "publish_snapshot",
    "refresh_head",
    "with_chunks",
]


@dataclass(frozen=True)
class Published:
    digest: str
    serial: int
    head_expires: str
    rollout: Rollout | None = None  # what head.json now carries


# The current head's rollout in, the one the re-signed head carries out.
RolloutRevision = Callable[[Rollout | None], Rollout | None]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace: the same document always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    body, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    if not body.isdigit() or int(body) <= 0:
        raise SettingsError(f"{text!r} is not a duration (examples: 3600, 90m, 12h, 7d)")
    return int(body) * units[unit]


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``8M``, ``1G`` (powers of 1024) → bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    upper = text.strip().upper().removesuffix("IB").removesuffix("B")
    body, unit = (upper[:-1], upper[-1]) if upper and upper[-1] in units else (upper, "")
    if not body.isdigit() or int(body) <= 0:
        raise SettingsError(f"{text!r} is not a size (examples: 65536, 64K, 8M, 1G)")
    return int(body) * units.get(unit, 1)


@dataclass(frozen=True)
class ChunksFilled:
    """What ``with_chunks`` did: model files given chunk digests, and files it looked for in
    vain (or that already had them, or are one chunk or less: nothing to gain)."""

    filled: int
    not_found: int
    skipped: int


CHUNK_READ = 1 << 20  # bytes read per call while hashing a model file


def with_chunks(
    snapshot: dict[str, Any], folder: Path, *, chunk_bytes: int
) -> tuple[dict[str, Any], ChunksFilled]:
    """A copy of ``snapshot`` whose model files found in ``folder`` carry per-chunk digests
    (docs/contract.md §2 ``chunks``): ``chunk_bytes`` each, the last one shorter.

    A file is looked for by content address, ``folder/blobs/sha256/<hex>`` (a node's store, a
    LAN cache), then as ``folder/<name>/<version>/<path>`` (a node's models folder), then as
    ``folder/<path>``; the first with the declared size is read once, for the whole-file digest
    and the chunks at the same time. A file whose bytes do not match its declared digest is
    refused: the chunks would vouch for bytes no node accepts. Files that already have
    ``chunks``, or are not longer than one chunk, are left as they are."""

    def chunks(source: Path, entry: dict[str, Any]) -> dict[str, Any]:
        digests = piece_digests(
            source, entry, chunk_bytes, new=hashlib.sha256, what="chunk digests"
        )
        return {"size": chunk_bytes, "digests": ["sha256:" + d.hex() for d in digests]}

    document = copy.deepcopy(snapshot)
    counts = fill_model_files(document, folder, field="chunks", above=chunk_bytes, make=chunks)
    return document, ChunksFilled(*counts)


def fill_model_files(
    document: dict[str, Any],
    folder: Path,
    *,
    field: str,
    above: int,
    make: Callable[[Path, dict[str, Any]], dict[str, Any]],
) -> tuple[int, int, int]:
    """Set ``field`` of every model file of ``document`` longer than ``above`` bytes and found
    in ``folder`` to ``make(the file found, its entry)``, in place; (filled, looked for in vain,
    skipped). A file that already has ``field`` is skipped: the publisher's own value stands."""
    filled = not_found = skipped = 0
    for model, entry in _model_files(document):
        if field in entry or int(entry.get("size", 0)) <= above:
            skipped += 1
            continue
        source = _find_model_file(folder, model, entry)
        if source is None:
            not_found += 1
            continue
        entry[field] = make(source, entry)
        filled += 1
    return filled, not_found, skipped


def _model_files(document: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    models = document.get("models")
    for model in models if isinstance(models, list) else []:
        files = model.get("files") if isinstance(model, dict) else None
        for entry in files if isinstance(files, list) else []:
            if isinstance(entry, dict):
                yield model, entry


def _find_model_file(folder: Path, model: dict[str, Any], entry: dict[str, Any]) -> Path | None:
    path, digest = str(entry.get("path", "")), str(entry.get("digest", ""))
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None  # the schema refuses the snapshot later; never read outside the folder
    places = [folder.joinpath(*parts)]
    name, version = str(model.get("name", "")), str(model.get("version", ""))
    if name and version and "/" not in name + version and ".." not in (name, version):
        places.insert(0, folder / name / version / Path(*parts))
    hex_ = digest.removeprefix("sha256:")
    if hex_ != digest and hex_.isalnum():
        places.insert(0, folder / "blobs" / "sha256" / hex_)
    for place in places:
        try:
            if place.is_file() and place.stat().st_size == entry.get("size"):
                return place
        except OSError:
            continue
    return None


def piece_digests(
    source: Path, entry: dict[str, Any], length: int, *, new: Callable[[], Any], what: str
) -> list[bytes]:
    """The ``new()`` digest of each ``length``-byte piece of ``source`` (the last one shorter),
    read once; a ``SettingsError`` when the whole file is not the entry's declared digest, as
    the pieces would vouch for bytes no node accepts (``what`` names them in the error)."""
    whole, piece, have = hashlib.sha256(), new(), 0
    digests: list[bytes] = []
    try:
        with source.open("rb") as handle:
            while data := handle.read(min(CHUNK_READ, length - have)):
                whole.update(data)
                piece.update(data)
                have += len(data)
                if have == length:
                    digests.append(piece.digest())
                    piece, have = new(), 0
    except OSError as exc:
        raise SettingsError(f"cannot read {source}: {exc.strerror or exc}") from exc
    if have:
        digests.append(piece.digest())
    if "sha256:" + whole.hexdigest() != entry.get("digest"):
        raise SettingsError(
            f"{source} does not match the digest of {entry.get('path')} "
            f"({entry.get('digest')}): refusing to publish {what} of other bytes"
        )
    return digests


def _checked(schema: SchemaName, obj: dict[str, Any]) -> None:
    try:
        validate(schema, obj)
    except SchemaError as exc:
        raise SettingsError(f"refusing to sign an invalid {schema}: {exc}") from exc


def make_root(
    *,
    version: int,
    network: str,
    threshold: int,
    public_keys: Sequence[tuple[str, bytes]],
    expires: int,
    signers: Sequence[SigningKey],
) -> bytes:
    """Root ``version``: for N > 1, ``signers`` must include a threshold of root N-1's keys."""
    payload = {
        "version": version,
        "network": network,
        "threshold": threshold,
        "keys": [{"keyid": kid, "public": raw.hex()} for kid, raw in public_keys],
        "expires": format_time(expires),
    }
    _checked("root", payload)
    try:
        Root.from_payload(payload)
    except ValueError as exc:
        raise SettingsError(f"refusing to sign this root: {exc}") from exc
    return seal(ROOT_TYPE, canonical_json(payload), signers)


def _previous_head(origin: Path) -> dict[str, Any] | None:
    try:
        envelope = parse_envelope((origin / "head.json").read_bytes())
        head = loads_strict(envelope.payload)
    except FileNotFoundError:
        return None
    except (EnvelopeError, JsonError) as exc:
        raise SettingsError(f"{origin / 'head.json'} is not a head envelope: {exc}") from exc
    return head if isinstance(head, dict) else None


def _wait_for_a_new_second(path: Path) -> None:
    """Let head.json's mtime move to a later second than the one it replaces.

    Stock web servers derive validators from the mtime in whole seconds: nginx's ETag is
    (mtime, size), Last-Modified is the mtime. Two heads of the same size written within one
    second would look identical, and a node that polled between them would be answered 304
    until the next publish. Waits at most one second; a previous mtime further in the future
    (the clock went back) is not waited for.
    """
    try:
        previous = math.floor(path.stat().st_mtime)
    except FileNotFoundError:
        return
    wait = previous + 1 - time.time()
    if 0 < wait <= 1.0:
        time.sleep(wait)


def _write_head(
    origin: Path,
    *,
    network: str,
    serial: int,
    digest: str,
    now: float,
    expires: int,
    rollout: Rollout | None,
    signers: Sequence[SigningKey],
) -> None:
    head: dict[str, Any] = {
        "network": network,
        "serial": serial,
        "config_digest": digest,
        "issued_at": format_time(now),
        "expires": format_time(expires),
    }
    if rollout is not None:
        head["rollout"] = rollout.to_payload()
    _checked("head", head)
    try:
        Head.from_payload(head)
    except ValueError as exc:
        raise SettingsError(f"refusing to sign this head: {exc}") from exc
    envelope = seal(HEAD_TYPE, canonical_json(head), signers)
    _wait_for_a_new_second(origin / "head.json")
    write_atomic(origin / "head.json", envelope)


def publish_snapshot(
    origin: Path,
    snapshot: dict[str, Any],
    *,
    signers: Sequence[SigningKey],
    now: float,
    expires_in_s: int,
    rollout: Rollout | None = None,
) -> Published:
    """Sign ``snapshot`` and make it the origin's head, staged by ``rollout`` if given.

    ``serial`` defaults to the current head's + 1, ``issued_at`` to now and ``expires`` to
    now + ``expires_in_s``; ``network`` must be given. A serial that does not go up is refused.
    """
    document = dict(snapshot)
    previous = _previous_head(origin)
    last_serial = int(previous["serial"]) if previous else 0
    document.setdefault("serial", last_serial + 1)
    document.setdefault("issued_at", format_time(now))
    document.setdefault("expires", format_time(now + expires_in_s))
    _checked("snapshot", document)
    try:
        Snapshot.from_payload(document)
    except ValueError as exc:
        raise SettingsError(f"refusing to sign this snapshot: {exc}") from exc
    if document["serial"] <= last_serial:
        raise SettingsError(
            f"serial {document['serial']} does not exceed the published {last_serial}"
        )
    payload = canonical_json(document)
    digest = digest_of(payload)
    write_atomic(
        origin / "snapshots" / f"{digest.removeprefix('sha256:')}.json",
        seal(SNAPSHOT_TYPE, payload, signers),
    )
    expires = int(now + expires_in_s)
    _write_head(
        origin,
        network=document["network"],
        serial=document["serial"],
        digest=digest,
        now=now,
        expires=expires,
        rollout=rollout,
        signers=signers,
    )
    return Published(
        digest=digest,
        serial=document["serial"],
        head_expires=format_time(expires),
        rollout=rollout,
    )


def refresh_head(
    origin: Path,
    *,
    signers: Sequence[SigningKey],
    now: float,
    expires_in_s: int,
    revise: RolloutRevision | None = None,
) -> Published:
    """Re-sign ``head.json`` with a later ``expires``: same serial, same digest.

    The head keeps its rollout unless ``revise`` gives it another one. Nodes accept the same
    serial again only with the same digest, which this keeps, so a rollout can be paused or
    re-timed without publishing a new snapshot.
    """
    previous = _previous_head(origin)
    if previous is None:
        raise SettingsError(f"{origin} has no head.json to refresh")
    rollout = _rollout_of(origin, previous)
    if revise is not None:
        rollout = revise(rollout)
    expires = int(now + expires_in_s)
    _write_head(
        origin,
        network=previous["network"],
        serial=previous["serial"],
        digest=previous["config_digest"],
        now=now,
        expires=expires,
        rollout=rollout,
        signers=signers,
    )
    return Published(
        digest=previous["config_digest"],
        serial=previous["serial"],
        head_expires=format_time(expires),
        rollout=rollout,
    )


def _rollout_of(origin: Path, head: dict[str, Any]) -> Rollout | None:
    if "rollout" not in head:
        return None
    try:
        validate("head", head)
        return Rollout.from_payload(head["rollout"])
    except (SchemaError, ValueError) as exc:
        raise SettingsError(f"{origin / 'head.json'} has an invalid rollout: {exc}") from exc
