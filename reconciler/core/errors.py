"""The project's own error types: every edge module maps third-party exceptions to these.

Errors are split by blame, which decides what the agent does next:

* ``RejectedError``: a document from the network failed a check (docs/contract.md §3). Nothing is
  committed; the node stays on its last known configuration.
* ``OriginUnreachableError``: the transport failed (DNS, refused, timeout, 5xx). Not the
  document's fault; the next poll tries again.
* ``SnapshotFaultError``: applying a verified snapshot failed *because of the snapshot*
  (a container that will not start, a failed health gate). The apply layer rolls back and
  quarantines the digest (docs/contract.md §5).
* ``TransientError``: anything else during an apply (Podman, registry or mirror down, a hash
  mismatch, a full disk, a veto): nothing is quarantined, the next pass retries.
* ``SettingsError``: bad node settings or usage (exit 2); ``UntrustedPathError`` is the kind
  for a trusted file that someone else could have written (strict modes).

This module imports nothing from the project and performs no I/O.
"""

from __future__ import annotations

__all__ = [
    "ContainerError",
    "DiskSpaceError",
    "DownloadError",
    "HashMismatchError",
    "HistoryError",
    "HookVetoError",
    "LockHeldError",
    "OriginUnreachableError",
    "PodmanUnavailableError",
    "ReconcilerError",
    "RegistryError",
    "RejectedError",
    "SettingsError",
    "SnapshotFaultError",
    "TransientError",
    "UntrustedPathError",
]


class ReconcilerError(Exception):
    """Base of every error the project raises on purpose. ``exit_code`` maps it for the CLI."""

    exit_code: int = 1

    def one_line(self) -> str:
        """The message as a single line, as the CLI and ``status`` show it."""
        return " ".join(str(self).split())


class SettingsError(ReconcilerError):
    """Node settings or command-line usage are wrong."""

    exit_code = 2


class UntrustedPathError(SettingsError):
    """A file the agent would trust (settings, root, hook, state) could be written by someone
    other than root or the agent's user (``disk.strict``): exit 2, or a veto for a hook."""


class RejectedError(ReconcilerError):
    """A document from the origin failed verification (docs/contract.md §3)."""

    exit_code = 4

    def __init__(self, document: str, reason: str) -> None:
        self.document = document
        self.reason = reason
        super().__init__(f"rejected {document}: {reason}")


class OriginUnreachableError(ReconcilerError):
    """The origin could not be reached or answered with a transport-level failure."""

    exit_code = 5

    def __init__(self, document: str, reason: str) -> None:
        self.document = document
        self.reason = reason
        super().__init__(f"origin unreachable fetching {document}: {reason}")


class HistoryError(ReconcilerError):
    """The local state repository is inconsistent or cannot be written."""


class LockHeldError(ReconcilerError):
    """Another reconciler holds the state lock."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another reconciler is running ({who} holds the lock)")


class TransientError(ReconcilerError):
    """A failure that is not the snapshot's fault; the next pass retries it."""


class PodmanUnavailableError(TransientError):
    """The Podman API service cannot be reached or answered with an unexpected failure."""


class RegistryError(TransientError):
    """An image could not be pulled, or the pulled digest differs from the pinned one."""


class ContainerError(TransientError):
    """A Podman operation on a container failed for a reason not attributable to the snapshot."""


class DownloadError(TransientError):
    """A model file could not be downloaded from any mirror."""


class HashMismatchError(DownloadError):
    """Downloaded or stored bytes do not match the declared size or digest."""


class DiskSpaceError(TransientError):
    """Not enough free space for what the plan needs, or the disk filled up."""


class HookVetoError(TransientError):
    """The pre-apply hook refused the apply."""


class SnapshotFaultError(ReconcilerError):
    """Applying the snapshot failed because of its contents: rollback and quarantine."""
