"""``reconcile fetch``: poll the origin once and commit a new verified snapshot.

The I/O shell around ``trust``: it reads bytes through ``origin``, hands them to the pure
checks with one ``now`` for the whole fetch, persists accepted roots, and commits an accepted
snapshot through ``history``. It applies nothing.

Whether ``main`` advances (docs/contract.md §4): only to a higher serial than HEAD's, only
when no hold is active and the digest is not quarantined, and, for a head with a rollout
(docs/contract.md §8), only once this node's wave has opened; otherwise the snapshot is
stored under its ref alone and waits. Holds, quarantine and pins come before the rollout. The
anti-rollback floor rises with every accepted head, whatever the wave. The rollout of the
newest head is kept in the node record with its waiting snapshot, so that ``enter_wave`` can
move ``main`` when the wave opens without asking the origin again. Rejections and transport
failures are recorded for ``status`` and re-raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reconciler.core.documents import Head, Root, format_time, parse_time
from reconciler.core.errors import (
    HistoryError,
    OriginUnreachableError,
    ReconcilerError,
    RejectedError,
)
from reconciler.core.record import (
    AcceptedHead,
    LastError,
    entered_wave,
    fetch_failed,
    fetch_succeeded,
    head_moved,
    head_moved_to,
)
from reconciler.core.rollout import Admission, RolloutWait, head_position
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
from reconciler.disk.keys import read_public_key
from reconciler.history.node import Node
from reconciler.history.repo import StoredSnapshot
from reconciler.intake.origin import Origin

__all__ = ["FetchResult", "enter_wave", "fetch", "note_moved_head"]

# Why a snapshot waits when HEAD is already at (or past) its serial.
_HIGHER = "HEAD has a higher serial"


@dataclass(frozen=True)
class FetchResult:
    status: str  # "current" | "new" | "waiting"
    digest: str | None
    serial: int | None
    message: str


@dataclass(frozen=True)
class _Gate:
    """Whether a verified snapshot becomes HEAD now: if not, why, and what it waits for."""

    why: str | None  # None: it advances
    wait: RolloutWait | None = None  # the head's rollout, while the snapshot waits
    admission: Admission | None = None  # the wave it advances through

    @property
    def advance(self) -> bool:
        return self.why is None


_CURRENT = _Gate(why=None)  # the head names HEAD's own snapshot: nothing to decide


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
        # The head is the one already recorded, with its rollout: a wave may have opened.
        return enter_wave(node, now=now) or FetchResult(
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
    status, gate = _store_or_advance(node, origin, root, head, now=now, limits=limits)
    accepted = AcceptedHead(
        serial=head.serial,
        digest=head.config_digest,
        expires=format_time(head.expires),
        etag=answer.etag,
        new_head=history.head_oid() if status == "new" else None,
        waiting=status == "waiting",
        rollout_wait=gate.wait,
        admission=gate.admission if status == "new" else None,
    )
    node.save(fetch_succeeded(node.state, at=format_time(now), head=accepted))
    return FetchResult(status, head.config_digest, head.serial, _message(status, head, gate))


def _message(status: str, head: Head, gate: _Gate) -> str:
    named = f"snapshot {head.serial} ({head.config_digest})"
    if status == "waiting":
        return f"{named} stored, waiting: {gate.why}"
    if status == "new":
        return f"{named} is the new HEAD{_through(gate.admission)}"
    return f"{named} is current"


def _through(admission: Admission | None) -> str:
    if admission is None:
        return ""
    return f" (rollout wave {admission.wave}, this node at {admission.position} %)"


def _store_or_advance(
    node: Node, origin: Origin, root: Root, head: Head, *, now: float, limits: TrustLimits
) -> tuple[str, _Gate]:
    """Fetch, verify and store the snapshot ``head`` names, unless stored already; move
    ``main`` to it if it may advance. Returns the fetch status (new, waiting or current) and
    the decision that gave it.

    A head naming a snapshot already stored is decided again: it may be the same snapshot
    re-signed with another rollout (paused, resumed, re-timed), or one whose wave has opened.
    """
    history = node.history
    existing = history.snapshot_ref(head.config_digest)
    if existing is None:
        snap_path = f"snapshots/{head.config_digest.removeprefix('sha256:')}.json"
        body = origin.get(snap_path, max_bytes=limits.snapshot_max_bytes).body
        verified = verify_snapshot(
            root, body, head=head, network=node.network, now=now, limits=limits
        )
        gate = _gate(node, head, serial=verified.snapshot.serial, now=now)
        history.store(
            StoredSnapshot(
                digest=verified.digest,
                serial=verified.snapshot.serial,
                network=node.network,
                root_version=verified.root_version,
                signed_by=verified.signed_by,
                payload=verified.payload,
                envelope=verified.envelope,
                admission=gate.admission,
            ),
            advance=gate.advance,
        )
        return ("new" if gate.advance else "waiting"), gate
    stored_serial = history.info(existing).serial
    check_stored_snapshot(head, stored_serial=stored_serial)
    # A node never leaves a snapshot it took because of a rollout: HEAD's own is current.
    if history.head_oid() == existing or _head_names(node, head.config_digest):
        return "current", _CURRENT
    gate = _gate(node, head, serial=stored_serial, now=now)
    if not gate.advance:
        return "waiting", gate
    # Its wave has opened, or a pass was killed before main moved to it: finish that move.
    history.advance_to(existing, admission=gate.admission)
    return "new", gate


def _head_names(node: Node, digest: str) -> bool:
    """Whether HEAD is a commit of ``digest`` (a rollback or resume commit of it, say)."""
    head = node.history.head_oid()
    try:
        return head is not None and node.history.info(head).digest == digest
    except HistoryError:  # an operator's own commit: not a snapshot at all
        return False


def _gate(node: Node, head: Head, *, serial: int, now: float) -> _Gate:
    """Holds, quarantine and pins first; then the head's rollout at ``now``."""
    note_moved_head(node)
    why = _held_back(node, digest=head.config_digest, serial=serial)
    wait = None
    if head.rollout is not None:
        _keyid, public_key = read_public_key(node.paths.node_pub)
        wait = RolloutWait(
            digest=head.config_digest,
            serial=serial,
            position=head_position(head, public_key),
            rollout=head.rollout,
        )
    admission = wait.admission(now) if wait is not None else None
    if why is None and wait is not None and admission is None:
        why = wait.describe(now)
    if why is not None:
        return _Gate(why=why, wait=wait)
    return _Gate(why=None, admission=admission)


def enter_wave(node: Node, *, now: float | None = None) -> FetchResult | None:
    """Move ``main`` to the snapshot that waits for its rollout wave, if it opened by ``now``.

    No network: the rollout recorded with the snapshot decides, but only while the head that
    carried it is unexpired (a node that cannot learn of a newer head, a pause perhaps, does
    not go on under an expired one). Holds, quarantine and pins come first, as in a fetch.
    Returns None when nothing enters.
    """
    now = time.time() if now is None else now
    state = node.state
    wait = RolloutWait.from_record(state.rollout_wait)
    admission = wait.admission(now) if wait is not None else None
    expires = state.last_head_expires
    if wait is None or admission is None or expires is None or parse_time(expires) <= now:
        return None
    oid = node.history.snapshot_ref(wait.digest)
    if oid is None:
        return None
    note_moved_head(node)
    if _held_back(node, digest=wait.digest, serial=wait.serial) is not None:
        return None
    new_head = node.history.advance_to(oid, admission=admission)
    at = format_time(now)
    node.save(entered_wave(node.state, wait=wait, admission=admission, head=new_head, at=at))
    message = f"snapshot {wait.serial} ({wait.digest}) is the new HEAD{_through(admission)}"
    return FetchResult("new", wait.digest, wait.serial, message)


def note_moved_head(node: Node) -> None:
    """An operator who moved HEAD with stock git has put the node on hold (docs/contract.md §4).

    Unless the reflog says this agent moved it and was killed before it could record that.
    """
    head = node.history.head_oid()
    if head is None or not head_moved(node.state, head):
        return
    by_reconciler = node.history.head_moved_by_reconciler(head)
    node.save(head_moved_to(node.state, head=head, by_reconciler=by_reconciler))


def _held_back(node: Node, *, digest: str, serial: int) -> str | None:
    """Why a snapshot may not become HEAD whatever its rollout says; None if nothing holds it.

    Call after ``note_moved_head``, so that a HEAD moved with git counts as the hold it is.
    """
    if digest in node.state.quarantined:
        return "quarantined"
    if node.state.hold:
        return f"hold ({node.state.hold_reason or 'rollback'})"
    head = node.history.head_oid()
    if head is not None and node.history.info(head).serial >= serial:
        return _HIGHER
    return None
