"""The full check of the model store: every blob and every installed tree file hashed again,
whatever the index says.

Where it sits: ``reconcile verify`` (through ``ModelStore.verify_all``); the cheap per-pass
checks trust the index, this is what catches bytes that rotted under an unchanged stat. Each
inode is hashed once: a tree file that links a blob already hashed is judged by that blob.

What it may not do: fetch or re-link anything. With ``repair`` it deletes what is bad (a bad
blob, a damaged tree file, a stray file in a tree), so that the next apply fetches and links
it again; without, it changes only the index's records.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from reconciler.models.blobs import BlobFolder, file_entries
from reconciler.models.index import Index
from reconciler.models.layout import blob_hex
from reconciler.models.trees import InstalledModel, Trees, remove_entry, walk_tree

__all__ = ["BadFile", "audit"]


@dataclass(frozen=True)
class BadFile:
    """A file whose bytes are not what its name says (found by ``verify_all``)."""

    path: Path
    digest: str  # the digest it should have
    reason: str
    repaired: bool  # deleted, so that the next fetch/install puts it back

    def one_line(self) -> str:
        fix = " (deleted; the next apply fetches it again)" if self.repaired else ""
        return f"{self.path}: {self.reason}{fix}"


def audit(*, index: Index, blobs: BlobFolder, trees: Trees, repair: bool) -> list[BadFile]:
    """See ``ModelStore.verify_all``."""
    run = _Audit(blobs, repair=repair)
    with index.lock:
        known = index.contents().blobs
        for blob in sorted(file_entries(blobs.dir)):
            problem = blobs.verify(blob, run.good_inodes, run.bad_inodes)
            if problem is not None:
                # Forget it was ever verified, repair or not: otherwise the cheap stat check
                # would keep trusting a blob whose bytes rotted under an unchanged stat.
                known.pop(blob.name, None)
                if repair:
                    blob.unlink(missing_ok=True)
                run.bad.append(BadFile(blob, f"sha256:{blob.name}", problem, repaired=repair))
        for installed in trees.installed():
            run.tree(installed)
        index.save_if_store_exists()
    return run.bad


class _Audit:
    """What one audit learnt: the inodes known good (→ hex) or bad, and the bad files."""

    def __init__(self, blobs: BlobFolder, *, repair: bool) -> None:
        self._blobs = blobs
        self._repair = repair
        self.good_inodes: dict[int, str] = {}
        self.bad_inodes: set[int] = set()
        self.bad: list[BadFile] = []

    def tree(self, installed: InstalledModel) -> None:
        if installed.files is None:
            self.bad.append(
                BadFile(
                    installed.path,
                    "",
                    "installed tree without a record of its files; cannot verify",
                    repaired=False,
                )
            )
            return
        repair = self._repair
        for rel, digest in sorted(installed.files.items()):
            path = installed.path / rel
            problem = self._tree_file(path, blob_hex(digest))
            if problem is None:
                continue
            fixable = repair and problem != "missing"
            if fixable:
                remove_entry(path)
            self.bad.append(BadFile(path, digest, problem, repaired=fixable))
        for rel in sorted(set(walk_tree(installed.path) or {}) - set(installed.files)):
            # A runtime may load every file it finds (all *.safetensors): strays matter.
            if repair:
                remove_entry(installed.path / rel)
            self.bad.append(
                BadFile(installed.path / rel, "", "not part of the model", repaired=repair)
            )

    def _tree_file(self, path: Path, want: str) -> str | None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        good = self.good_inodes.get(st.st_ino)
        if good is not None:
            return None if good == want else f"links the blob of sha256:{good[:16]}…"
        if st.st_ino in self.bad_inodes:
            return "digest mismatch (shares a damaged blob)"
        try:
            got = self._blobs.hash_file(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if got != want:
            self.bad_inodes.add(st.st_ino)
            return f"digest mismatch (sha256:{got[:16]}…)"
        self.good_inodes[st.st_ino] = got
        return None
