"""What a snapshot commit says about its snapshot: its message and trailers (docs/contract.md §4).

Pure text, used only by ``history.repo``: ``commit_message`` writes the message of a new
commit, ``commit_info`` reads one back. It never opens the repository and decides nothing
about trust; a message without the trailers (an operator's own commit) is a ``HistoryError``.

A commit that moved ``main`` through a rollout wave (docs/contract.md §8) also carries
``Rollout-Wave: N``, ``Rollout-Wave-At: <time>`` (when that wave opened) and
``Rollout-Position: 37.21`` (where this node stood), after ``Reason``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.documents import format_time, parse_time
from reconciler.core.errors import HistoryError
from reconciler.core.rollout import Admission, Position

__all__ = ["CommitInfo", "StoredSnapshot", "commit_info", "commit_message"]

# The subject line's verb per Reason trailer; any other reason is written as it is.
_VERBS = {"fetch": "Accept", "rollback": "Roll back to", "resume": "Resume at"}


@dataclass(frozen=True)
class StoredSnapshot:
    """What ``store`` needs of a verified snapshot (kept free of the trust types on purpose)."""

    digest: str
    serial: int
    network: str
    root_version: int
    signed_by: tuple[str, ...]
    payload: bytes
    envelope: bytes
    admission: Admission | None = None  # the wave it becomes HEAD through (trailers)


@dataclass(frozen=True)
class CommitInfo:
    oid: str
    digest: str
    serial: int
    network: str
    root_version: int
    signed_by: tuple[str, ...]
    reason: str
    time: int  # commit time, epoch seconds
    admission: Admission | None = None  # from the Rollout-* trailers

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


def commit_message(stored: StoredSnapshot, *, reason: str) -> str:
    verb = _VERBS.get(reason, reason)
    return (
        f"{verb} snapshot {stored.serial} ({stored.digest[:19]}…)\n\n"
        f"Config-Digest: {stored.digest}\n"
        f"Serial: {stored.serial}\n"
        f"Network: {stored.network}\n"
        f"Root-Version: {stored.root_version}\n"
        f"Signed-By: {', '.join(sorted(stored.signed_by))}\n"
        f"Reason: {reason}\n"
    ) + _rollout_trailers(stored.admission)


def _rollout_trailers(admission: Admission | None) -> str:
    if admission is None:
        return ""
    return (
        f"Rollout-Wave: {admission.wave}\n"
        f"Rollout-Wave-At: {format_time(admission.wave_at)}\n"
        f"Rollout-Position: {admission.position}\n"
    )


def _admission(trailers: dict[str, str]) -> Admission | None:
    if "Rollout-Wave" not in trailers:
        return None
    return Admission(
        wave=int(trailers["Rollout-Wave"]),
        wave_at=parse_time(trailers["Rollout-Wave-At"]),
        position=Position.parse(trailers["Rollout-Position"]),
    )


def _trailers(message: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key and " " not in key:
            found[key] = value.strip()
    return found


def commit_info(message: str, *, oid: str, time: int) -> CommitInfo:
    """The trailers of the commit ``oid`` (made at ``time``) read back from its message."""
    t = _trailers(message)
    try:
        return CommitInfo(
            oid=oid,
            digest=t["Config-Digest"],
            serial=int(t["Serial"]),
            network=t["Network"],
            root_version=int(t["Root-Version"]),
            signed_by=tuple(s.strip() for s in t["Signed-By"].split(",") if s.strip()),
            reason=t["Reason"],
            time=time,
            admission=_admission(t),
        )
    except (KeyError, ValueError) as exc:
        raise HistoryError(f"commit {oid[:12]} lacks the reconciler trailers") from exc
