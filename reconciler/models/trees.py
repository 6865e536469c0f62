"""Installed model trees, ``models/<name>/<version>/<path>``: hard links to verified blobs,
the folders runtimes mount.

Where it sits: after the fetch. ``install`` builds a new tree aside (``work/models/trees/``)
and renames it into place, or repairs an existing one file by file, each by an atomic rename,
so a running container that mounts it sees whole files only. ``is_installed`` is the cheap
converged check: a walk of the tree and one ``lstat`` per file, compared with the index's
record of the blob; no blob is opened.

What it may not do: follow a symlink inside a tree, link a blob ``BlobFolder`` does not vouch
for, or write outside the tree, ``work/models/trees`` and ``work/models/trash``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.documents import ModelSpec, format_time
from reconciler.core.errors import TransientError
from reconciler.disk.atomic import fsync_dir
from reconciler.models.blobs import BlobFolder
from reconciler.models.index import Index
from reconciler.models.layout import (
    RESERVED_NAMES,
    ModelLayoutError,
    StoreLayout,
    blob_hex,
    is_layout_name,
    os_failure,
    same_filesystem,
)

__all__ = [
    "BlobsMissingError",
    "InstalledModel",
    "Trees",
    "is_real_dir",
    "remove_entry",
    "walk_tree",
]

_log = logging.getLogger("reconciler.modelstore")


class BlobsMissingError(TransientError):
    """``install`` was asked for a model whose blobs are not all fetched and verified."""


@dataclass(frozen=True)
class InstalledModel:
    model_id: str
    path: Path
    files: dict[str, str] | None  # path → digest as installed; None if the index lost it


class Trees:
    """The installed trees of one store."""

    def __init__(self, layout: StoreLayout, index: Index, blobs: BlobFolder) -> None:
        self._layout = layout
        self._root = layout.root
        self._index = index
        self._blobs = blobs

    def path(self, model: ModelSpec) -> Path:
        return self._root / model.name / model.version

    def is_installed(self, model: ModelSpec) -> bool:
        """True when the tree holds exactly the model's files, each the verified blob.
        Costs a walk of the tree and one lstat per file; opens nothing."""
        # Plain strings, not Path objects: this runs for every model on every pass.
        found = walk_tree(os.path.join(self._root, model.name, model.version))
        if found is None or set(found) != {f.path for f in model.files}:
            return False
        blobs = self._index.contents().blobs
        for file in model.files:
            # A key lookup only (no path is built from it), so the digest's form, checked when
            # the snapshot was read, needs no second regular-expression match per file.
            record = blobs.get(file.digest.removeprefix("sha256:"))
            if record is None or record.size != file.size or not record.matches(found[file.path]):
                return False
        return True

    def installed(self) -> list[InstalledModel]:
        """Trees under ``models/`` (by listing the folders), with what the index says they hold."""
        models = self._index.contents().models
        result = []
        for name in _subdir_names(self._root):
            if name in RESERVED_NAMES or not is_layout_name(name):
                continue
            for version in _subdir_names(os.path.join(self._root, name)):
                if not is_layout_name(version):
                    continue
                model_id = f"{name}:{version}"
                entry = models.get(model_id)
                files = dict(entry["files"]) if entry else None
                path = self._root / name / version
                result.append(InstalledModel(model_id=model_id, path=path, files=files))
        return result

    def install(self, model: ModelSpec) -> bool:
        """See ``ModelStore.install``; ``model`` passed ``check_models``."""
        if self.is_installed(model):
            return False
        with self._index.saving_on_return():
            absent = [f for f in model.files if not self._blobs.is_verified(f.digest)]
        if absent:
            raise BlobsMissingError(
                f"cannot install {model.id}: {len(absent)} file(s) not fetched "
                f"(first: {absent[0].path})"
            )
        tree = self.path(model)
        try:
            if is_real_dir(tree):
                self._repair(model, tree)
            else:
                self._build(model, tree)
        except OSError as exc:
            raise os_failure(exc, f"installing {model.id}") from exc
        with self._index.lock:
            self._index.contents().models[model.id] = {
                "files": {f.path: f.digest for f in model.files},
                "installed_at": format_time(time.time()),
            }
            self._index.save()
        return True

    def discard(self, path: Path) -> None:
        """Make ``path`` disappear at once (rename into the trash), then delete it."""
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
        trash = self._layout.trash_dir
        trash.mkdir(parents=True, exist_ok=True)
        doomed = trash / f"{path.name}.{secrets.token_hex(6)}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _build(self, model: ModelSpec, tree: Path) -> None:
        if tree.exists() or tree.is_symlink():
            self.discard(tree)  # a file or symlink squatting on the tree's name
        build_dir, blob_dir = self._layout.build_dir, self._blobs.dir
        build_dir.mkdir(parents=True, exist_ok=True)
        same_filesystem(build_dir, blob_dir)
        aside = Path(tempfile.mkdtemp(prefix=f"{model.name}@{model.version}.", dir=build_dir))
        try:
            for file in model.files:
                target = aside / file.path
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(blob_dir / blob_hex(file.digest), target)
                except (FileExistsError, NotADirectoryError) as exc:
                    raise ModelLayoutError(
                        f"model {model.id}: file {file.path!r} conflicts with another file's path"
                    ) from exc
            aside.chmod(0o755)
            tree.parent.mkdir(parents=True, exist_ok=True)
            _fsync_tree_dirs(aside)
            os.rename(aside, tree)
            fsync_dir(tree.parent)
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise

    def _repair(self, model: ModelSpec, tree: Path) -> None:
        found = walk_tree(tree) or {}
        wanted = {f.path: f for f in model.files}
        blobs = self._index.contents().blobs
        for rel in sorted(set(found) - set(wanted), reverse=True):
            _log.warning("removing unexpected file %s from model %s", rel, model.id)
            remove_entry(tree / rel)
        for rel, file in wanted.items():
            st = found.get(rel)
            record = blobs.get(blob_hex(file.digest))
            if st is not None and record is not None and record.matches(st):
                continue
            target = tree / rel
            _make_real_dirs(tree, target.parent)
            if is_real_dir(target):
                shutil.rmtree(target)
            scratch = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            os.link(self._blobs.dir / blob_hex(file.digest), scratch)
            os.replace(scratch, target)
            _log.info("repaired %s in model %s", rel, model.id)
        _prune_empty_dirs(tree, keep={str(Path(p).parent) for p in wanted})
        fsync_dir(tree)


def is_real_dir(path: str | Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def walk_tree(tree: str | Path) -> dict[str, os.stat_result] | None:
    """Relative path → lstat of every non-directory entry under ``tree`` (symlinks are
    entries, never followed); None if ``tree`` is not a real directory."""
    if not is_real_dir(tree):
        return None
    found: dict[str, os.stat_result] = {}
    pending: list[tuple[str | Path, str]] = [(tree, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, rel + "/"))
                else:
                    found[rel] = entry.stat(follow_symlinks=False)
    return found


def remove_entry(path: Path) -> None:
    """Delete a file, symlink or whole real directory inside a tree."""
    if is_real_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _subdir_names(path: str | Path) -> list[str]:
    """Names of the real directories in ``path``, sorted (as their paths would sort)."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _make_real_dirs(tree: Path, folder: Path) -> None:
    """Create ``folder`` under ``tree``, replacing any symlink or file in its way."""
    current = tree
    for part in folder.relative_to(tree).parts:
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            current.mkdir()
            continue
        if not stat.S_ISDIR(mode):
            current.unlink()
            current.mkdir()


def _prune_empty_dirs(tree: Path, *, keep: set[str]) -> None:
    for folder, subdirs, files in os.walk(tree, topdown=False):
        rel = os.path.relpath(folder, tree)
        if rel != "." and rel not in keep and not subdirs and not files:
            with contextlib.suppress(OSError):
                Path(folder).rmdir()


def _fsync_tree_dirs(tree: Path) -> None:
    for folder, _subdirs, _files in os.walk(tree):
        fsync_dir(Path(folder))
