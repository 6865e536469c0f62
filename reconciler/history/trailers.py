"""What a snapshot commit says about its snapshot: its message and trailers (docs/contract.md §4).

Pure text, used only by ``history.repo``: ``commit_message`` writes the message of a new
commit, ``commit_info`` reads one back. It never opens the repository and decides nothing
about trust; a message without the trailers (an operator's own commit) is a ``HistoryError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.errors import HistoryError

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
        )
    except (KeyError, ValueError) as exc:
        raise HistoryError(f"commit {oid[:12]} lacks the reconciler trailers") from exc
