"""``reconcile fetch``: poll the origin once and commit a new verified snapshot.

The I/O shell around ``trust``: it reads bytes through ``origin``, hands them to the pure
checks with one ``now`` for the whole fetch, persists accepted roots, and commits an accepted
snapshot through ``history``. It applies nothing.

Whether ``main`` advances (docs/contract.md §4): only to a higher serial than HEAD's, only
when no hold is active and the digest is not quarantined; otherwise the snapshot is stored
under its ref alone and waits. Rejections and transport failures are recorded for ``status``
and re-raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reconciler.core.documents import Head, Root, format_time, parse_time
from reconciler.core.errors import OriginUnreachableError, ReconcilerError, RejectedError
from reconciler.core.record import (
    AcceptedHead,
    LastError,
    fetch_failed,
    fetch_succeeded,
    head_moved,
    head_moved_to,
)
from reconciler.core.trust import (
    DEFAULT_LIMITS,
    TrustLimits,
    VerifiedRoot,
    check_cached_head_fresh,
    check_root_fresh,
    check_stored_snapshot,
    verify_head,
    verify_next_root,
    verify_snapshot,
)
from reconciler.history.node import Node
from reconciler.history.repo import StoredSnapshot
from reconciler.intake.origin import Origin

__all__ = ["FetchResult", "fetch", "note_moved_head"]


@dataclass(frozen=True)
class FetchResult:
    status: str  # "current" | "new" | "waiting"
    digest: str | None
    serial: int | None
    message: str


def _walk_roots(node: Node, origin: Origin, *, now: float, limits: TrustLimits) -> Root:
    """Follow root N+1, N+2, … and return the newest trusted root.

    The new roots are persisted only once the walk ends in an unexpired root: a chain that
    fails leaves the trusted roots as they were (docs/contract.md §3: nothing changes), so a
    root the network re-publishes with a later ``expires`` is fetched again.
    """
    current = node.roots.newest()
    walked: list[VerifiedRoot] = []
    for _ in range(limits.max_root_walk):
        path = f"root/{current.root.version + 1}.json"
        answer = origin.get(path, max_bytes=limits.root_max_bytes, missing_ok=True)
        if answer.status == 404:
            break
        current = verify_next_root(current.root, answer.body, network=node.network, limits=limits)
        walked.append(current)
    check_root_fresh(current.root, now=now, limits=limits)
    for verified in walked:
        node.roots.accept(verified)
    return current.root


def fetch(
    node: Node, *, now: float | None = None, limits: TrustLimits = DEFAULT_LIMITS
) -> FetchResult:
    origin_url = node.settings.normalised_origin()
    if origin_url is None:
        raise OriginUnreachableError("head.json", "no origin configured")
    now = time.time() if now is None else now
    try:
        with Origin(origin_url, deadline_s=node.settings.fetch_timeout_s) as origin:
            result = _fetch(node, origin, now=now, limits=limits)
    except RejectedError as exc:
        _record_failure(node, "rejected", exc)
        raise
    except OriginUnreachableError as exc:
        _record_failure(node, "unreachable", exc)
        raise
    return result


def _record_failure(node: Node, kind: str, error: ReconcilerError) -> None:
    failure = LastError(at=format_time(time.time()), kind=kind, message=error.one_line())
    node.save(fetch_failed(node.state, error=failure))


def _fetch(node: Node, origin: Origin, *, now: float, limits: TrustLimits) -> FetchResult:
    root = _walk_roots(node, origin, now=now, limits=limits)
    state = node.state
    history = node.history
    known_etag = (
        state.head_etag if state.last_digest and history.snapshot_ref(state.last_digest) else None
    )
    answer = origin.get("head.json", max_bytes=limits.head_max_bytes, etag=known_etag)
    if answer.status == 304:
        if state.last_head_expires is not None:
            check_cached_head_fresh(parse_time(state.last_head_expires), now=now, limits=limits)
        node.save(fetch_succeeded(node.state, at=format_time(now)))
        return FetchResult(
            "current", state.last_digest, state.last_serial, "head.json not modified"
        )
    floor_serial, floor_digest = node.floor()
    verified_head = verify_head(
        root,
        answer.body,
        network=node.network,
        now=now,
        last_serial=floor_serial,
        last_digest=floor_digest,
        limits=limits,
    )
    head = verified_head.head
    status = _store_or_advance(node, origin, root, head, now=now, limits=limits)
    accepted = AcceptedHead(
        serial=head.serial,
        digest=head.config_digest,
        expires=format_time(head.expires),
        etag=answer.etag,
        new_head=history.head_oid() if status == "new" else None,
        waiting=status == "waiting",
    )
    node.save(fetch_succeeded(node.state, at=format_time(now), head=accepted))
    if status == "new":
        message = f"snapshot {head.serial} ({head.config_digest}) is the new HEAD"
    elif status == "waiting":
        why = _why_waiting(node, head.config_digest)
        message = f"snapshot {head.serial} ({head.config_digest}) stored, waiting: {why}"
    else:
        message = f"snapshot {head.serial} ({head.config_digest}) is current"
    return FetchResult(status, head.config_digest, head.serial, message)


def _store_or_advance(
    node: Node, origin: Origin, root: Root, head: Head, *, now: float, limits: TrustLimits
) -> str:
    """Fetch, verify and store the snapshot ``head`` names, unless stored already; move
    ``main`` to it if it may advance. Returns the fetch status: new, waiting or current."""
    history = node.history
    existing = history.snapshot_ref(head.config_digest)
    if existing is None:
        snap_path = f"snapshots/{head.config_digest.removeprefix('sha256:')}.json"
        body = origin.get(snap_path, max_bytes=limits.snapshot_max_bytes).body
        verified = verify_snapshot(
            root, body, head=head, network=node.network, now=now, limits=limits
        )
        advance = _may_advance(node, serial=verified.snapshot.serial, digest=verified.digest)
        history.store(
            StoredSnapshot(
                digest=verified.digest,
                serial=verified.snapshot.serial,
                network=node.network,
                root_version=verified.root_version,
                signed_by=verified.signed_by,
                payload=verified.payload,
                envelope=verified.envelope,
            ),
            advance=advance,
        )
        return "new" if advance else "waiting"
    stored_serial = history.info(existing).serial
    check_stored_snapshot(head, stored_serial=stored_serial)
    # Stored by a pass that was killed before main moved to it: finish that move.
    if history.head_oid() != existing and _may_advance(
        node, serial=stored_serial, digest=head.config_digest
    ):
        history.advance_to(existing)
        return "new"
    return "current"


def note_moved_head(node: Node) -> None:
    """An operator who moved HEAD with stock git has put the node on hold (docs/contract.md §4).

    Unless the reflog says this agent moved it and was killed before it could record that.
    """
    head = node.history.head_oid()
    if head is None or not head_moved(node.state, head):
        return
    by_reconciler = node.history.head_moved_by_reconciler(head)
    node.save(head_moved_to(node.state, head=head, by_reconciler=by_reconciler))


def _may_advance(node: Node, *, serial: int, digest: str) -> bool:
    note_moved_head(node)
    if node.state.hold or digest in node.state.quarantined:
        return False
    head = node.history.head_oid()
    return head is None or node.history.info(head).serial < serial


def _why_waiting(node: Node, digest: str) -> str:
    if digest in node.state.quarantined:
        return "quarantined"
    if node.state.hold:
        return f"hold ({node.state.hold_reason or 'rollback'})"
    return "HEAD has a higher serial"
