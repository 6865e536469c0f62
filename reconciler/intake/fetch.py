"""``reconcile fetch``: poll the origin once and commit a new verified snapshot.

The I/O shell around ``trust``: it reads bytes through ``origin``, hands them to the pure
checks with one ``now`` for the whole fetch, persists accepted roots, and commits an accepted
snapshot through ``history``. It applies nothing.

Whether ``main`` advances (contract §4): only to a higher serial than HEAD's, only when no hold
is active and the digest is not quarantined; otherwise the snapshot is stored under its ref
alone and waits. Rejections and transport failures are recorded for ``status`` and re-raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from reconciler.core.documents import Root, format_time, parse_time
from reconciler.core.errors import OriginUnreachableError, RejectedError
from reconciler.core.record import NodeState
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

__all__ = ["FetchResult", "fetch"]

_FETCH_ERRORS = frozenset({"rejected", "unreachable"})  # kinds `fetch` itself records


@dataclass(frozen=True)
class FetchResult:
    status: str  # "current" | "new" | "waiting"
    digest: str | None
    serial: int | None
    message: str


def _walk_roots(node: Node, origin: Origin, *, now: float, limits: TrustLimits) -> Root:
    """Follow root N+1, N+2, … and return the newest trusted root.

    The new roots are persisted only once the walk ends in an unexpired root: a chain that
    fails leaves the trusted roots as they were (contract §3: nothing changes), so a root the
    network re-publishes with a later ``expires`` is fetched again.
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
        node.record_error("rejected", exc)
        raise
    except OriginUnreachableError as exc:
        node.record_error("unreachable", exc)
        raise
    return result


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
        node.save(_succeeded(node, now=now))
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
        status = "new" if advance else "waiting"
    else:
        stored_serial = history.info(existing).serial
        check_stored_snapshot(head, stored_serial=stored_serial)
        status = "current"
        # Stored by a pass that was killed before main moved to it: finish that move.
        if history.head_oid() != existing and _may_advance(
            node, serial=stored_serial, digest=head.config_digest
        ):
            history.advance_to(existing)
            status = "new"
    node.save(
        replace(
            _succeeded(node, now=now),
            last_serial=max(head.serial, node.state.last_serial),
            last_digest=head.config_digest,
            last_head_expires=format_time(head.expires),
            head_etag=answer.etag,
            expected_head=history.head_oid() if status == "new" else node.state.expected_head,
            waiting=(*node.state.waiting, head.config_digest)
            if status == "waiting" and head.config_digest not in node.state.waiting
            else node.state.waiting,
        )
    )
    if status == "new":
        message = f"snapshot {head.serial} ({head.config_digest}) is the new HEAD"
    elif status == "waiting":
        why = _why_waiting(node, head.config_digest)
        message = f"snapshot {head.serial} ({head.config_digest}) stored, waiting: {why}"
    else:
        message = f"snapshot {head.serial} ({head.config_digest}) is current"
    return FetchResult(status, head.config_digest, head.serial, message)


def _succeeded(node: Node, *, now: float) -> NodeState:
    """A fetch that worked clears what the last failed fetch recorded (not apply errors)."""
    last_error = node.state.last_error
    if last_error is not None and last_error.kind in _FETCH_ERRORS:
        last_error = None
    return replace(
        node.state,
        last_fetch_ok_at=format_time(now),
        last_rejection=None,
        last_error=last_error,
    )


def note_moved_head(node: Node) -> None:
    """An operator who moved HEAD with stock git has put the node on hold (contract §4)."""
    head = node.history.head_oid()
    expected = node.state.expected_head
    if head is None or expected is None or head == expected or node.state.hold:
        return
    if node.history.head_moved_by_reconciler(head):
        # This agent moved main and was killed before it could record the new HEAD.
        node.save(replace(node.state, expected_head=head))
        return
    node.save(replace(node.state, hold=True, hold_reason=f"HEAD moved with git to {head[:12]}"))


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
