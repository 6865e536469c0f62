"""The receipt notes of the state repository: ``refs/notes/applied``, one line per apply attempt.

Edge module (pygit2), used through ``History`` (``notes``, ``append_note``, ``noted_commits``).
Each line is a signed receipt (``history.receipts`` makes them); this module only stores and
lists the lines, it neither signs nor checks them (``reconcile verify`` does). A note is
rewritten whole with the new line appended, so ``git log --notes=applied`` shows every attempt.
"""

from __future__ import annotations

from pathlib import Path

import pygit2

from reconciler.core.errors import HistoryError
from reconciler.history.leftovers import clear_stale_locks

__all__ = ["NOTES", "ReceiptNotes"]

NOTES = "refs/notes/applied"


class ReceiptNotes:
    def __init__(self, repo: pygit2.Repository) -> None:
        self._repo = repo

    def lines(self, oid: str) -> list[str]:
        """The receipt lines on commit ``oid``, oldest first (none: an empty list)."""
        try:
            note = self._repo.lookup_note(oid, NOTES)
        except KeyError:
            return []
        except (ValueError, pygit2.GitError) as exc:
            raise HistoryError(f"cannot read the receipt note of {oid[:12]}: {exc}") from exc
        return [line for line in note.message.splitlines() if line.strip()]

    def append(self, oid: str, line: str, *, signature: pygit2.Signature) -> None:
        lines = [*self.lines(oid), line]
        clear_stale_locks(Path(self._repo.path), NOTES)
        try:
            self._repo.create_note("\n".join(lines) + "\n", signature, signature, oid, NOTES, True)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot write the receipt note: {exc}") from exc

    def commits(self) -> list[str]:
        """Every commit that carries a receipt note."""
        try:
            notes = self._repo.notes(NOTES)  # type: ignore[call-arg]
            return [str(note.annotated_id) for note in notes]
        except (KeyError, pygit2.GitError):
            return []
