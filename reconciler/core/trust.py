"""The trust workflow of docs/contract.md §3, on bytes in memory: root rotation, head, snapshot.

Where it sits: between the origin edge (which reads bytes with size limits) and the history
edge (which commits what this module accepted). Pure: no I/O, no clock (callers pass ``now``,
one value per fetch), no logging. Every failure is a ``RejectedError`` naming the document.

Invariants:
* Checks run in the contract's order and the first failure rejects: size → (root rotation) →
  envelope shape and payloadType → threshold of distinct trusted keys → schema and network →
  the rules no schema states (a head's rollout waves, a root's keys, a snapshot's names) →
  expiry → serial → snapshot digest and serial.
* A root N+1 is trusted only when signed by a threshold of root N's keys *and* of its own,
  with version exactly N+1; only the final root of a walk must be unexpired.
* The signed bytes are used exactly as served: nothing is re-serialised before hashing.
* Re-verifying a commit from history uses the root that accepted it and skips expiry and
  serial (they were checked at intake, and time has moved on since).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    Envelope,
    EnvelopeError,
    parse_envelope,
    valid_keyids,
)
from reconciler.core.errors import RejectedError
from reconciler.core.schema import SchemaError, SchemaName, validate

__all__ = [
    "DEFAULT_LIMITS",
    "TrustLimits",
    "VerifiedHead",
    "VerifiedRoot",
    "VerifiedSnapshot",
    "check_cached_head_fresh",
    "check_root_fresh",
    "check_stored_snapshot",
    "reverify_snapshot",
    "verify_head",
    "verify_initial_root",
    "verify_next_root",
    "verify_snapshot",
]


@dataclass(frozen=True)
class TrustLimits:
    root_max_bytes: int = 64 * 1024  # bytes, docs/contract.md §3.1
    head_max_bytes: int = 64 * 1024  # bytes
    snapshot_max_bytes: int = 16 * 1024 * 1024  # bytes
    max_root_walk: int = 32  # root versions accepted per fetch
    clock_skew_s: int = 300  # seconds a document may look expired and still pass


DEFAULT_LIMITS = TrustLimits()


@dataclass(frozen=True)
class VerifiedRoot:
    root: Root
    envelope: bytes  # as served
    payload: bytes


@dataclass(frozen=True)
class VerifiedHead:
    head: Head
    envelope: bytes
    payload: bytes
    signed_by: tuple[str, ...]  # sorted key ids


@dataclass(frozen=True)
class VerifiedSnapshot:
    snapshot: Snapshot
    digest: str
    envelope: bytes
    payload: bytes
    signed_by: tuple[str, ...]
    root_version: int


def _check_size(document: str, data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise RejectedError(document, f"larger than the {limit}-byte limit")


def _open(document: str, data: bytes, payload_type: str) -> Envelope:
    try:
        envelope = parse_envelope(data)
    except EnvelopeError as exc:
        raise RejectedError(document, str(exc)) from exc
    if envelope.payload_type != payload_type:
        raise RejectedError(
            document, f"payloadType is {envelope.payload_type[:80]!r}, expected {payload_type!r}"
        )
    return envelope


def _require_threshold(
    document: str, envelope: Envelope, keys: Mapping[str, bytes], threshold: int, whose: str
) -> tuple[str, ...]:
    good = valid_keyids(envelope, keys)
    if len(good) < threshold:
        raise RejectedError(
            document,
            f"{len(good)} valid signature(s) by {whose} keys, threshold is {threshold}",
        )
    return tuple(sorted(good))


def _payload(document: str, payload: bytes, schema: SchemaName, network: str) -> dict[str, Any]:
    try:
        obj = loads_strict(payload)
    except JsonError as exc:
        raise RejectedError(document, f"payload is {exc}") from exc
    try:
        validate(schema, obj)
    except SchemaError as exc:
        raise RejectedError(document, f"payload does not match the {schema} schema: {exc}") from exc
    if obj["network"] != network:
        raise RejectedError(document, f"network is {obj['network']}, this node is on {network}")
    assert isinstance(obj, dict)
    return obj


def _check_expiry(document: str, expires: int, now: float, skew: int) -> None:
    if expires + skew <= now:
        raise RejectedError(document, f"expired at {format_time(expires)}")


def verify_initial_root(
    data: bytes, *, network: str, limits: TrustLimits = DEFAULT_LIMITS
) -> VerifiedRoot:
    """The root the operator installed: trusted by fiat, but it must be self-consistent."""
    document = "root"
    _check_size(document, data, limits.root_max_bytes)
    envelope = _open(document, data, ROOT_TYPE)
    obj = _payload(document, envelope.payload, "root", network)
    root = _root_from(document, obj)
    _require_threshold(document, envelope, root.key_by_id(), root.threshold, "its own")
    return VerifiedRoot(root=root, envelope=data, payload=envelope.payload)


def _root_from(document: str, obj: dict[str, Any]) -> Root:
    try:
        return Root.from_payload(obj)
    except ValueError as exc:
        raise RejectedError(document, str(exc)) from exc


def verify_next_root(
    trusted: Root, data: bytes, *, network: str, limits: TrustLimits = DEFAULT_LIMITS
) -> VerifiedRoot:
    """Root N+1 against root N: a threshold of the old keys and of the new ones."""
    expected = trusted.version + 1
    document = f"root/{expected}.json"
    _check_size(document, data, limits.root_max_bytes)
    envelope = _open(document, data, ROOT_TYPE)
    _require_threshold(
        document, envelope, trusted.key_by_id(), trusted.threshold, "the previous root's"
    )
    obj = _payload(document, envelope.payload, "root", network)
    root = _root_from(document, obj)
    _require_threshold(document, envelope, root.key_by_id(), root.threshold, "its own")
    if root.version != expected:
        raise RejectedError(document, f"version is {root.version}, expected {expected}")
    return VerifiedRoot(root=root, envelope=data, payload=envelope.payload)


def check_root_fresh(root: Root, *, now: float, limits: TrustLimits = DEFAULT_LIMITS) -> None:
    """Only the newest root of a walk must be unexpired."""
    _check_expiry(f"root/{root.version}.json", root.expires, now, limits.clock_skew_s)


def check_cached_head_fresh(
    expires: int, *, now: float, limits: TrustLimits = DEFAULT_LIMITS
) -> None:
    """An origin answering "not modified" re-serves the head the node holds: it must still be
    unexpired, or a frozen origin could keep the node on an old snapshot without a word."""
    if expires + limits.clock_skew_s <= now:
        raise RejectedError(
            "head.json",
            f"expired at {format_time(expires)} (the origin answers 'not modified')",
        )


def verify_head(
    root: Root,
    data: bytes,
    *,
    network: str,
    now: float,
    last_serial: int,
    last_digest: str | None,
    limits: TrustLimits = DEFAULT_LIMITS,
) -> VerifiedHead:
    document = "head.json"
    _check_size(document, data, limits.head_max_bytes)
    envelope = _open(document, data, HEAD_TYPE)
    signed_by = _require_threshold(document, envelope, root.key_by_id(), root.threshold, "trusted")
    head = _head_from(document, _payload(document, envelope.payload, "head", network))
    _check_expiry(document, head.expires, now, limits.clock_skew_s)
    if head.serial < last_serial:
        raise RejectedError(
            document, f"serial {head.serial} is below the last accepted {last_serial}"
        )
    if head.serial == last_serial and last_digest is not None and head.config_digest != last_digest:
        raise RejectedError(
            document,
            f"serial {head.serial} was already accepted with another digest ({last_digest})",
        )
    return VerifiedHead(head=head, envelope=data, payload=envelope.payload, signed_by=signed_by)


def _head_from(document: str, obj: dict[str, Any]) -> Head:
    # The rollout rules a schema cannot state (wave times rising, percents not falling) are
    # checked as the Head is built; a break is a rejection like any schema failure.
    try:
        return Head.from_payload(obj)
    except ValueError as exc:
        raise RejectedError(document, str(exc)) from exc


def _snapshot_from(document: str, obj: dict[str, Any]) -> Snapshot:
    try:
        return Snapshot.from_payload(obj)
    except ValueError as exc:
        raise RejectedError(document, str(exc)) from exc


def verify_snapshot(
    root: Root,
    data: bytes,
    *,
    head: Head,
    network: str,
    now: float,
    limits: TrustLimits = DEFAULT_LIMITS,
) -> VerifiedSnapshot:
    document = f"snapshots/{head.config_digest.removeprefix('sha256:')}.json"
    _check_size(document, data, limits.snapshot_max_bytes)
    envelope = _open(document, data, SNAPSHOT_TYPE)
    signed_by = _require_threshold(document, envelope, root.key_by_id(), root.threshold, "trusted")
    obj = _payload(document, envelope.payload, "snapshot", network)
    snapshot = _snapshot_from(document, obj)
    _check_expiry(document, snapshot.expires, now, limits.clock_skew_s)
    digest = digest_of(envelope.payload)
    if digest != head.config_digest:
        raise RejectedError(
            document, f"payload hashes to {digest}, head.json names {head.config_digest}"
        )
    if snapshot.serial != head.serial:
        raise RejectedError(
            document, f"serial {snapshot.serial} differs from head.json's {head.serial}"
        )
    return VerifiedSnapshot(
        snapshot=snapshot,
        digest=digest,
        envelope=data,
        payload=envelope.payload,
        signed_by=signed_by,
        root_version=root.version,
    )


def check_stored_snapshot(head: Head, *, stored_serial: int) -> None:
    """A head naming a snapshot already in the history: the serials must still agree (§3.8).

    The snapshot is not fetched again, but a head may not pair a known digest with another
    serial: that would raise the anti-rollback floor to a serial no snapshot carries.
    """
    if stored_serial != head.serial:
        document = f"snapshots/{head.config_digest.removeprefix('sha256:')}.json"
        raise RejectedError(
            document, f"serial {stored_serial} differs from head.json's {head.serial}"
        )


def reverify_snapshot(
    root: Root, *, envelope_bytes: bytes, payload_bytes: bytes, digest: str, network: str
) -> VerifiedSnapshot:
    """Re-check a commit from history against the root that accepted it (no expiry, no serial)."""
    document = f"commit {digest}"
    envelope = _open(document, envelope_bytes, SNAPSHOT_TYPE)
    signed_by = _require_threshold(document, envelope, root.key_by_id(), root.threshold, "trusted")
    if envelope.payload != payload_bytes:
        raise RejectedError(document, "snapshot.json differs from the envelope's payload")
    actual = digest_of(payload_bytes)
    if actual != digest:
        raise RejectedError(document, f"snapshot.json hashes to {actual}")
    snapshot = _snapshot_from(document, _payload(document, payload_bytes, "snapshot", network))
    return VerifiedSnapshot(
        snapshot=snapshot,
        digest=digest,
        envelope=envelope_bytes,
        payload=payload_bytes,
        signed_by=signed_by,
        root_version=root.version,
    )
