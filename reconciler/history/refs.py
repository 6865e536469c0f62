"""The references of the state repository, read and written by compare-and-swap.

Edge module (pygit2), used only by ``history.repo``. The names:

* ``refs/heads/main``: the snapshot the node converges to (moved by ``History`` only);
* ``refs/snapshots/<hex>``: the first commit of each accepted digest;
* ``refs/reconciler/accepted``: the commit of the highest serial ever accepted. The
  anti-rollback floor lives outside ``main`` so that a reset HEAD cannot lower it; this module
  writes whatever it is given, ``History.store`` decides when the floor rises.

Every write names the target the caller saw and fails if the ref moved meanwhile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pygit2

from reconciler.core.errors import HistoryError
from reconciler.history.leftovers import clear_stale_locks

__all__ = ["ACCEPTED", "MAIN", "Refs"]

MAIN = "refs/heads/main"
ACCEPTED = "refs/reconciler/accepted"
_SNAPSHOTS = "refs/snapshots/"


def _snapshot_ref(digest: str) -> str:
    return _SNAPSHOTS + digest.removeprefix("sha256:")


class Refs:
    def __init__(self, repo: pygit2.Repository) -> None:
        self._repo = repo

    def target(self, name: str) -> str | None:
        """The commit ``name`` resolves to, or None when there is no such ref."""
        # pygit2 (1.21) keeps a reference to the name it looks up whenever the ref exists: each
        # lookup with a freshly built string leaked that string, 128 bytes per poll for
        # refs/snapshots/<hex> (bench/watch_memory.py, tracemalloc). Interned, every lookup of
        # one ref passes the same string object, so the leak stays one string per ref.
        name = sys.intern(name)
        try:
            ref = self._repo.lookup_reference(name)
        except (KeyError, pygit2.InvalidSpecError):
            return None
        try:
            return str(ref.resolve().target)
        except (KeyError, pygit2.GitError) as exc:
            raise HistoryError(f"cannot resolve {name}: {exc}") from exc

    def swap(self, name: str, oid: str, *, expected: str | None, log: str) -> None:
        """Point ``name`` at ``oid`` if it still points at ``expected`` (None: absent)."""
        current = self.target(name)
        if current != expected:
            raise HistoryError(f"{name} moved under us (expected {expected}, found {current})")
        clear_stale_locks(Path(self._repo.path), name, "packed-refs")
        try:
            self._repo.create_reference_direct(name, pygit2.Oid(hex=oid), True, message=log)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot update {name}: {exc}") from exc

    def snapshot(self, digest: str) -> str | None:
        return self.target(_snapshot_ref(digest))

    def name_snapshot(self, digest: str, oid: str) -> None:
        """Write the ref of a newly accepted digest (it must not exist yet)."""
        self.swap(_snapshot_ref(digest), oid, expected=None, log="accept")

    def snapshots(self) -> dict[str, str]:
        """Every stored digest → the commit its ref names."""
        try:
            names = [name for name in self._repo.references if name.startswith(_SNAPSHOTS)]
        except pygit2.GitError as exc:
            raise HistoryError(f"cannot list the snapshot refs: {exc}") from exc
        refs: dict[str, str] = {}
        for name in names:
            target = self.target(name)
            if target:
                refs["sha256:" + name.rsplit("/", 1)[1]] = target
        return refs

    def floor(self) -> str | None:
        return self.target(ACCEPTED)

    def raise_floor(self, oid: str, *, expected: str | None) -> None:
        self.swap(ACCEPTED, oid, expected=expected, log="accept")
