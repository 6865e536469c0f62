"""What a killed writer leaves in the state repository's git directory, and its removal.

Edge module (pygit2, files), used only inside ``history``. libgit2 writes a ref, HEAD, the
index or the notes ref through ``<name>.lock`` and renames it into place, and writes objects
through ``tmp_object_git2_*`` scratch files; a process killed in between leaves them, and every
later update of that name fails ("failed to lock file") until someone deletes the lock. Every
writer of the repository holds the agent lock (``reconciler.lock``), so whatever is found here
while holding it belongs to a writer that is gone. Call these only with that lock held.
"""

from __future__ import annotations

from pathlib import Path

import pygit2

from reconciler.core.errors import HistoryError

__all__ = ["clear_stale_locks", "discard_interrupted_writes"]


def clear_stale_locks(gitdir: Path, *names: str) -> None:
    """Delete ``<name>.lock`` for each name (a ref, ``HEAD``, ``index``) before writing it."""
    for name in names:
        (gitdir / f"{name}.lock").unlink(missing_ok=True)


def discard_interrupted_writes(repo: pygit2.Repository) -> list[Path]:
    """Delete every scratch object and lock file; returns what it removed.

    Scratch objects are never read by git (only ``git gc`` would remove them, weeks later). An
    interrupted checkout (an ``index.lock`` left behind) is finished.
    """
    gitdir = Path(repo.path)
    leftovers = [
        *gitdir.glob("objects/**/tmp_object_git2_*"),
        *gitdir.glob("refs/**/*.lock"),
        *(gitdir / name for name in ("HEAD.lock", "index.lock", "packed-refs.lock")),
    ]
    removed = [path for path in leftovers if path.exists()]
    for path in removed:
        path.unlink(missing_ok=True)
    if gitdir / "index.lock" in removed and not repo.head_is_unborn:
        try:
            repo.checkout("HEAD", strategy=pygit2.GIT_CHECKOUT_FORCE)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot check out HEAD: {exc}") from exc
    return removed
