"""The state repository (docs/contract.md §4): every accepted snapshot is a git commit.

Edge module (pygit2): pygit2's exceptions stay inside ``history`` and become ``HistoryError``
(libgit2 reports a full disk or a read-only folder as ``OSError``: those too). ``History`` stores
and reads commits, moves ``main``, appends receipt notes; it decides nothing about trust.

Layout:
* a non-bare repository whose work tree is kept checked out at ``main`` (so that an operator's
  ``git checkout`` or ``git reset`` behaves as in any repository);
* each commit's tree holds ``snapshot.json`` (the verified payload bytes) and ``envelope.json``
  (the envelope bytes as served), its message carries the trailers of docs/contract.md §4
  (``history.trailers``);
* the refs ``main``, ``refs/snapshots/<hex>`` and the anti-rollback floor
  ``refs/reconciler/accepted`` (``history.refs``);
* ``refs/notes/applied`` holds one line per apply attempt (signed receipts, ``history.notes``).

Every write happens with the agent lock held (``reconciler.lock``), so a git lock file or a
scratch object found before a write was left by a writer that was killed: it is removed
(``history.leftovers``).

``main`` moves only through ``advance`` (a compare-and-swap on the expected tip, under the
node's lock file), and libgit2 fsyncs the git directory.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pygit2

from reconciler.core.errors import HistoryError
from reconciler.core.rollout import Admission
from reconciler.history.leftovers import clear_stale_locks, discard_interrupted_writes
from reconciler.history.notes import ReceiptNotes
from reconciler.history.refs import MAIN, Refs
from reconciler.history.trailers import CommitInfo, StoredSnapshot, commit_info, commit_message

__all__ = ["CommitInfo", "History", "StoredSnapshot"]

pygit2.settings.enable_fsync_gitdir(True)

SNAPSHOT_FILE = "snapshot.json"
ENVELOPE_FILE = "envelope.json"
_IDENTITY = ("reconciler", "reconciler@localhost")
# The reflog message of every move of main by the agent (``_reflog``).
_AGENT_REFLOG = re.compile(r"^(fetch|rollback|resume): serial \d+$")


def _reflog(reason: str, serial: int) -> str:
    return f"{reason}: serial {serial}"


class History:
    """The snapshot repository at ``path``."""

    def __init__(self, repo: pygit2.Repository) -> None:
        self._repo = repo
        self._refs = Refs(repo)
        self._notes = ReceiptNotes(repo)

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> History:
        try:
            if (path / ".git").is_dir():
                return cls(pygit2.Repository(str(path)))
            if not create:
                raise HistoryError(f"no state repository at {path} (run `reconcile init`)")
            path.mkdir(parents=True, exist_ok=True)
            repo = pygit2.init_repository(str(path), bare=False, initial_head="main")
            return cls(repo)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot open the state repository {path}: {exc}") from exc

    @property
    def path(self) -> Path:
        return Path(self._repo.workdir or self._repo.path)

    # ---- reading -------------------------------------------------------------------------

    def _commit(self, oid: str | pygit2.Oid) -> pygit2.Commit:
        try:
            obj = self._repo[oid]
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise HistoryError(f"no commit {oid} in the state repository") from exc
        commit = obj.peel(pygit2.Commit)
        assert isinstance(commit, pygit2.Commit)
        return commit

    def info(self, oid: str | pygit2.Oid) -> CommitInfo:
        commit = self._commit(oid)
        return commit_info(commit.message, oid=str(commit.id), time=commit.commit_time)

    def blobs(self, oid: str) -> tuple[bytes, bytes]:
        """(snapshot.json bytes, envelope.json bytes) of a commit."""
        tree = self._commit(oid).tree
        try:
            snapshot = tree[SNAPSHOT_FILE]
            envelope = tree[ENVELOPE_FILE]
        except KeyError as exc:
            raise HistoryError(f"commit {oid[:12]} lacks {exc.args[0]}") from exc
        return (
            self._repo[snapshot.id].read_raw(),
            self._repo[envelope.id].read_raw(),
        )

    def main_tip(self) -> str | None:
        return self._refs.target(MAIN)

    def head_oid(self) -> str | None:
        """What HEAD resolves to (the operator may have detached it with ``git checkout``)."""
        try:
            return str(self._repo.head.target)
        except pygit2.GitError:
            return None

    def head_is_detached(self) -> bool:
        return bool(self._repo.head_is_detached)

    def head_moved_by_reconciler(self, oid: str) -> bool:
        """Whether the last move of HEAD, to ``oid``, was this agent's own (``_move_main``).

        Told by HEAD's reflog: the agent writes ``<reason>: serial N``; stock git writes
        ``reset: …``, ``checkout: …``, ``commit: …``. A crash between moving ``main`` and
        recording the new HEAD in the node record must not look like an operator's hold.
        """
        try:
            newest = next(iter(self._repo.lookup_reference("HEAD").log()), None)
        except (KeyError, pygit2.GitError, OSError):
            return False
        return (
            newest is not None
            and str(newest.oid_new) == oid
            and _AGENT_REFLOG.match(newest.message or "") is not None
        )

    def snapshot_ref(self, digest: str) -> str | None:
        return self._refs.snapshot(digest)

    def snapshot_refs(self) -> dict[str, str]:
        """Every stored digest → the commit its ref names."""
        return self._refs.snapshots()

    def accepted_floor(self) -> CommitInfo | None:
        oid = self._refs.floor()
        return self.info(oid) if oid else None

    def log(self, start: str | None = None, *, limit: int | None = None) -> Iterator[CommitInfo]:
        """First-parent history from ``start`` (default HEAD), newest first."""
        oid = start or self.head_oid()
        count = 0
        while oid is not None and (limit is None or count < limit):
            commit = self._commit(oid)
            yield self.info(oid)
            count += 1
            oid = str(commit.parent_ids[0]) if commit.parent_ids else None

    def resolve(self, rev: str) -> str:
        """A digest (or a unique prefix of its hex), a serial, or any git revision → commit."""
        text = rev.strip()
        candidates = self.snapshot_refs()
        hexpart = text.removeprefix("sha256:")
        if len(hexpart) >= 6 and all(c in "0123456789abcdef" for c in hexpart):
            hits = [oid for digest, oid in candidates.items() if digest[7:].startswith(hexpart)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise HistoryError(f"digest prefix {hexpart} is ambiguous")
        if text.isdigit():
            for oid in candidates.values():
                if self.info(oid).serial == int(text):
                    return oid
        try:
            obj = self._repo.revparse_single(text)
        except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError) as exc:
            raise HistoryError(f"no snapshot matches {rev!r}") from exc
        return str(obj.peel(pygit2.Commit).id)

    # ---- writing -------------------------------------------------------------------------

    def _signature(self) -> pygit2.Signature:
        return pygit2.Signature(*_IDENTITY, int(time.time()), 0)

    def _write_commit(self, stored: StoredSnapshot, *, reason: str, parent: str | None) -> str:
        try:
            builder = self._repo.TreeBuilder()
            builder.insert(
                SNAPSHOT_FILE, self._repo.create_blob(stored.payload), pygit2.GIT_FILEMODE_BLOB
            )
            builder.insert(
                ENVELOPE_FILE, self._repo.create_blob(stored.envelope), pygit2.GIT_FILEMODE_BLOB
            )
            tree = builder.write()
            sig = self._signature()
            parents = [pygit2.Oid(hex=parent)] if parent else []
            message = commit_message(stored, reason=reason)
            oid = self._repo.create_commit(None, sig, sig, message, tree, parents)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot write a commit: {exc}") from exc
        return str(oid)

    def store(self, stored: StoredSnapshot, *, advance: bool) -> tuple[str, bool]:
        """Commit an accepted snapshot. Returns (commit, moved main).

        The same digest stored twice changes nothing. ``advance`` moves ``main`` (and HEAD,
        when it is attached) to the new commit; otherwise only its ref is written and the
        snapshot waits.
        """
        existing = self.snapshot_ref(stored.digest)
        if existing is not None:
            return existing, False
        tip = self.main_tip()
        oid = self._write_commit(stored, reason="fetch", parent=tip)
        self._refs.name_snapshot(stored.digest, oid)
        floor = self.accepted_floor()
        if floor is None or stored.serial > floor.serial:
            self._refs.raise_floor(oid, expected=floor.oid if floor else None)
        if advance:
            self._move_main(oid, expected=tip, log=_reflog("fetch", stored.serial))
        return oid, advance

    def recommit(self, source: str, *, reason: str, admission: Admission | None = None) -> str:
        """A new commit on ``main`` with the tree and trailers of ``source`` and a new Reason.

        ``source``'s own Rollout trailers are not copied: they said how it once became HEAD.
        ``admission`` gives the new commit its own (it becomes HEAD through that wave).
        """
        info = self.info(source)
        payload, envelope = self.blobs(source)
        stored = StoredSnapshot(
            digest=info.digest,
            serial=info.serial,
            network=info.network,
            root_version=info.root_version,
            signed_by=info.signed_by,
            payload=payload,
            envelope=envelope,
            admission=admission,
        )
        tip = self.main_tip()
        oid = self._write_commit(stored, reason=reason, parent=tip)
        self._move_main(oid, expected=tip, log=_reflog(reason, info.serial))
        return oid

    def advance_to(self, oid: str, *, admission: Admission | None = None) -> str:
        """Make the stored commit ``oid`` the tip of ``main``; returns the new tip.

        For a snapshot whose commit and ref were written by a pass that died before moving
        ``main``, or one that waited for its rollout wave (``admission``: the commit that
        moves ``main`` records that wave): a fast-forward when ``main`` is still the commit's
        parent and its trailers already say so, otherwise a new commit on top with the same
        tree and trailers (as ``recommit``).
        """
        commit = self._commit(oid)
        info = self.info(oid)
        tip = self.main_tip()
        parents = [str(p) for p in commit.parent_ids]
        if parents[:1] == ([tip] if tip else []) and info.admission == admission:
            self._move_main(oid, expected=tip, log=_reflog("fetch", info.serial))
            return oid
        return self.recommit(oid, reason="fetch", admission=admission)

    def reattach_main(self) -> None:
        """Point a detached HEAD back at ``main`` and check it out (used by ``resume``)."""
        self._check_out_main(attach=True)

    def _move_main(self, oid: str, *, expected: str | None, log: str) -> None:
        self._refs.swap(MAIN, oid, expected=expected, log=log)
        self._check_out_main(attach=False)

    def _check_out_main(self, *, attach: bool) -> None:
        """Check out ``main``; ``attach`` points HEAD at it even when HEAD names a branch."""
        clear_stale_locks(Path(self._repo.path), "HEAD", "index")
        try:
            if attach or self._repo.head_is_detached or self._repo.head_is_unborn:
                self._repo.set_head(MAIN)
            self._repo.checkout(MAIN, strategy=pygit2.GIT_CHECKOUT_FORCE)
        except (pygit2.GitError, OSError) as exc:
            raise HistoryError(f"cannot check out main: {exc}") from exc

    # ---- receipts ------------------------------------------------------------------------

    def notes(self, oid: str) -> list[str]:
        return self._notes.lines(oid)

    def append_note(self, oid: str, line: str) -> None:
        self._notes.append(oid, line, signature=self._signature())

    def noted_commits(self) -> list[str]:
        return self._notes.commits()

    # ---- upkeep --------------------------------------------------------------------------

    def discard_interrupted_writes(self) -> list[Path]:
        """Delete what a killed writer left in the git directory; returns what it removed.

        Call with the agent lock held: then no other writer of this repository is mid-write.
        """
        return discard_interrupted_writes(self._repo)
