"""The node's local state opened as one object: settings, paths, history, roots, record.

Edge module (files, git). Commands build a ``Node`` once and pass it down; nothing below the
CLI reads settings or the environment on its own. The record changes only through the
transitions of ``core.record``: callers compute the new record and ``save`` it. Strict modes
(``disk.strict``): the state folder, every folder above it and the entries the agent trusts
directly in it are checked when the ``Node`` is built and at each ``reload`` (a few dozen
``lstat`` calls, no walk of the tree), so nothing is read that another user could have
written; what lies deeper is guarded by those folders' modes, and ``reconcile verify``
reports drift from the modes the agent writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.config.settings import Settings
from reconciler.core.documents import Ttl
from reconciler.core.errors import ReconcilerError, SettingsError
from reconciler.core.paths import NodePaths
from reconciler.core.record import NodeState
from reconciler.disk.strict import check_trusted_entries
from reconciler.history.recordfile import load_node_state, save_node_state
from reconciler.history.repo import History

if TYPE_CHECKING:
    from reconciler.core.trust import VerifiedSnapshot
    from reconciler.history.repo import CommitInfo
    from reconciler.history.roots import RootChain

__all__ = ["Node", "check_state_folder"]

# The state folder's entries the agent trusts by reading them, and what a refusal calls them.
_TRUSTED_ENTRIES = (
    ("node-state.json", "node record"),
    ("roots", "trusted roots folder"),
    ("snapshots", "state repository"),
    ("node.key", "node key"),
    ("models", "model store"),
    ("runtime", "runtime folder"),
)


def check_state_folder(paths: NodePaths) -> None:
    """``UntrustedPathError`` unless the state folder and its trusted entries pass strict modes."""
    check_trusted_entries(paths.state_dir, _TRUSTED_ENTRIES, what="state folder")


class Node:
    def __init__(self, settings: Settings) -> None:
        if settings.network is None:
            raise SettingsError("no network configured (run `reconcile init`)")
        self.settings = settings
        self.network: str = settings.network
        self.paths = NodePaths(Path(settings.state_dir))
        self._history: History | None = None
        self._roots: RootChain | None = None
        check_state_folder(self.paths)
        self.state: NodeState = load_node_state(self.paths.node_state)

    @property
    def history(self) -> History:
        if self._history is None:
            self._history = History.open(self.paths.repo)
        return self._history

    @property
    def roots(self) -> RootChain:
        # Imported on first use: the trust code (and PyNaCl) is ~12 ms that `status` never needs.
        if self._roots is None:
            from reconciler.history.roots import RootChain

            self._roots = RootChain(self.paths.state_dir / "roots", network=self.network)
        return self._roots

    def save(self, state: NodeState) -> None:
        save_node_state(self.paths.node_state, state)
        self.state = state

    def reload(self) -> None:
        """Re-read the record (another command may have changed it between two cycles)."""
        check_state_folder(self.paths)
        self.state = load_node_state(self.paths.node_state)

    def head_ttl(self) -> Ttl | None:
        """The ``ttl`` of HEAD's snapshot (timers of the watch loop), if there is a HEAD."""
        oid = self.history.head_oid()
        if oid is None:
            return None
        try:
            payload, _ = self.history.blobs(oid)
            return Ttl(**json.loads(payload)["ttl"])
        except (ReconcilerError, ValueError, KeyError, TypeError):
            return None

    def reverify(self, oid: str) -> tuple[CommitInfo, VerifiedSnapshot]:
        """A stored commit checked again against the root that accepted it (its
        ``Root-Version``), ignoring expiry and serial: what apply, rollback and verify trust.

        Raises ``HistoryError`` for a commit that cannot be read, ``RejectedError`` for one
        that no longer verifies.
        """
        from reconciler.core.trust import reverify_snapshot

        info = self.history.info(oid)
        payload, envelope = self.history.blobs(oid)
        root = self.roots.version(info.root_version).root
        verified = reverify_snapshot(
            root,
            envelope_bytes=envelope,
            payload_bytes=payload,
            digest=info.digest,
            network=self.network,
        )
        return info, verified

    def floor(self) -> tuple[int, str | None]:
        """The anti-rollback floor: the higher of the record and the git ref's serial."""
        serial, digest = self.state.last_serial, self.state.last_digest
        accepted = self.history.accepted_floor()
        if accepted is not None and accepted.serial > serial:
            serial, digest = accepted.serial, accepted.digest
        return serial, digest
