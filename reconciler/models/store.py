"""The node's model files: a content-addressed blob store and the trees runtimes mount.

Where it sits: the first step of an apply. Before any container changes, the apply asks the
store for the models of the snapshot (``ensure``, or ``missing_blobs`` → ``check_space`` →
``fetch`` → ``install``); after the containers converged it prunes (``remove``, ``gc``).
``reconcile verify`` calls ``verify_all``; ``status`` calls ``states``; ``plan`` and
``once --offline`` use ``missing_blobs``, which contacts nothing.

Layout (contract §4), under ``paths.models``::

    blobs/sha256/<hex>           one file per digest, read-only, verified before it got its name
    <name>/<version>/<path>      installed trees: hard links to the blobs
    .index.json                  what was verified, and the last fetch failures (see Index)

Partial downloads (``work/models/partial/<hex>``) and trees being built
(``work/models/trees/…``) live under ``paths.work``, on the same filesystem, and reach a final
name only by ``rename`` once every byte is verified: a reader never sees a half-written blob
or a half-built tree. A blob shared by models or versions is stored and downloaded once.

Cheap no-op: the index records (size, mtime_ns, inode) of every verified blob. A tree file
whose ``lstat`` shows the recorded inode, size and mtime is the verified blob, so checking a
converged node costs one ``lstat`` per file and a directory walk per tree; no blob is opened
(``files_hashed`` counts the files this store read to hash them). Anything whose stat
differs is hashed again; a bad blob is deleted so the next fetch downloads it again.

What it may not do: contact anything except through ``reconciler.download`` during
``fetch``/``ensure``; write outside ``paths.models`` and ``paths.work``; follow a symlink
inside a tree; leave an exception of the standard library's unmapped where a project error
says more (disk full → ``DiskSpaceError``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import gc
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from reconciler.core.documents import ModelFile, ModelSpec, format_time
from reconciler.core.errors import (
    DiskSpaceError,
    DownloadError,
    HashMismatchError,
    ReconcilerError,
    TransientError,
)
from reconciler.core.paths import NodePaths
from reconciler.disk.atomic import fsync_dir, write_atomic
from reconciler.models.download import deadline_for, download_file
from reconciler.models.progress import ProgressReporter, format_bytes

__all__ = [
    "INDEX_NAME",
    "BadFile",
    "BlobsMissingError",
    "EnsureReport",
    "GcReport",
    "InstalledModel",
    "ModelLayoutError",
    "ModelState",
    "ModelStatus",
    "ModelStore",
]

_log = logging.getLogger("reconciler.modelstore")

INDEX_NAME = ".index.json"  # a leading dot: no model name can collide with it
INDEX_FORMAT = 1
# Newly verified blobs are written to the index at most this often (and always when the call
# that verified them returns): saving after every blob made an install of N small files cost
# N saves of an index of N records (bench/many_files.py: 10x the files took 33x the time).
INDEX_SAVE_EVERY_S = 1.0
HASH_CHUNK = 1024 * 1024  # bytes read per call when re-hashing a file on disk
RESERVED_NAMES = frozenset({"blobs"})  # would collide with models/blobs/sha256/<hex>

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class ModelState(enum.Enum):
    """A model's state in the network's vocabulary."""

    PENDING = "Pending"  # wanted; not (fully) on disk yet
    ACTIVE = "Active"  # wanted; installed and verified
    FAILED = "Failed"  # wanted; its last fetch served bytes that failed verification
    INACTIVE = "Inactive"  # installed, not wanted by this snapshot (kept for a rollback)


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    state: ModelState
    reason: str | None = None  # why Failed, or what a Pending model last ran into


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


@dataclass(frozen=True)
class InstalledModel:
    model_id: str
    path: Path
    files: dict[str, str] | None  # path → digest as installed; None if the index lost it


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    freed_bytes: int


@dataclass(frozen=True)
class EnsureReport:
    changed: tuple[str, ...]  # model ids whose tree was created or repaired by this call
    missing: tuple[ModelFile, ...]  # offline only: blobs that would have to be fetched


class ModelLayoutError(TransientError):
    """A model cannot be laid out on disk (reserved name, unsafe or conflicting paths, or the
    work folder on another filesystem)."""


class BlobsMissingError(TransientError):
    """``install`` was asked for a model whose blobs are not all fetched and verified."""


@dataclass(slots=True)
class _BlobRecord:
    size: int
    mtime_ns: int
    inode: int
    verified_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "inode": self.inode,
            "verified_at": self.verified_at,
        }

    def matches(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == self.size
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ino == self.inode
        )


@dataclass
class _Failure:
    kind: str  # "verification" (bytes served were wrong) or "download" (transport)
    reason: str
    at: str


class _Index:
    """The store's memory, in ``models/.index.json``. Format (``format`` = 1)::

        {"format": 1,
         "blobs":    {"<hex>": {"size": N, "mtime_ns": N, "inode": N, "verified_at": T}},
         "failures": {"<hex>": {"kind": "verification" | "download", "reason": S, "at": T}},
         "models":   {"<name>:<version>": {"files": {"<path>": "sha256:<hex>"},
                                           "installed_at": T}}}

    T is a contract time (``YYYY-MM-DDTHH:MM:SSZ``). An unreadable index is treated as
    empty: everything gets hashed again, nothing is trusted blindly.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs: dict[str, _BlobRecord] = {}
        self.failures: dict[str, _Failure] = {}
        self.models: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, path: Path) -> _Index:
        index = cls(path)
        try:
            with _collector_paused():
                raw = json.loads(path.read_bytes())
                if raw.get("format") != INDEX_FORMAT:
                    raise ValueError(f"unknown format {raw.get('format')!r}")
                # Positional: a tenth of a second less per 100,000 records than ``**v``.
                index.blobs = {
                    k: _BlobRecord(v["size"], v["mtime_ns"], v["inode"], v["verified_at"])
                    for k, v in raw["blobs"].items()
                }
                index.failures = {k: _Failure(**v) for k, v in raw["failures"].items()}
                index.models = dict(raw["models"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            _log.warning(
                "ignoring unreadable model index %s (%s); files will be re-hashed", path, exc
            )
            index = cls(path)
        return index

    def save(self) -> None:
        data = {
            "format": INDEX_FORMAT,
            "blobs": {k: v.as_json() for k, v in sorted(self.blobs.items())},
            "failures": {k: vars(v) for k, v in sorted(self.failures.items())},
            "models": dict(sorted(self.models.items())),
        }
        write_atomic(self.path, json.dumps(data, indent=1).encode() + b"\n")


class ModelStore:
    """See the module docstring. One store per process; its methods are not meant to be
    called concurrently except that ``fetch`` runs its own worker threads."""

    def __init__(self, paths: NodePaths) -> None:
        self.paths = paths
        self.root = paths.models
        self.blob_dir = paths.models / "blobs" / "sha256"
        self.partial_dir = paths.work / "models" / "partial"
        self.build_dir = paths.work / "models" / "trees"
        self.trash_dir = paths.work / "models" / "trash"
        self.files_hashed = 0  # files opened and hashed by this store (not downloads)
        self.bytes_hashed = 0
        self._lock = threading.RLock()
        self._index: _Index | None = None
        self._unsaved = False  # the index in memory holds verified blobs not yet on disk
        self._saved_at = time.monotonic()

    # ----------------------------------------------------------------- names

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / _hex(digest)

    def tree_path(self, model: ModelSpec) -> Path:
        return self.root / model.name / model.version

    # -------------------------------------------------------- cheap queries

    def missing_blobs(self, models: Iterable[ModelSpec]) -> list[ModelFile]:
        """Files to download for ``models``, one per digest, in snapshot order. Contacts
        nothing; hashes only blobs whose stat differs from what was verified."""
        with self._saving_on_return():
            return [file for file in _unique_files(models) if not self._blob_ok(file.digest)]

    def bytes_needed(self, models: Iterable[ModelSpec]) -> int:
        """Bytes still to download for ``models`` (partial downloads already count as done)."""
        return sum(self._still_to_download(f) for f in self.missing_blobs(models))

    def check_space(self, needed: int, reserve_bytes: int) -> None:
        """Raise ``DiskSpaceError`` (one line) unless ``needed`` bytes fit and leave
        ``reserve_bytes`` free. Changes nothing."""
        where = _existing_ancestor(self.root)
        info = os.statvfs(where)
        free = info.f_bavail * info.f_frsize
        if needed + reserve_bytes > free:
            raise DiskSpaceError(
                f"not enough disk space for model files: {format_bytes(needed)} to download "
                f"+ {format_bytes(reserve_bytes)} reserve, {format_bytes(free)} free on {where}"
            )

    def is_installed(self, model: ModelSpec) -> bool:
        """True when the tree holds exactly the model's files, each the verified blob.
        Costs a walk of the tree and one lstat per file; opens nothing."""
        # Plain strings, not Path objects: this runs for every model on every pass.
        found = _walk_tree(os.path.join(self.root, model.name, model.version))
        if found is None or set(found) != {f.path for f in model.files}:
            return False
        blobs = self._loaded().blobs
        for file in model.files:
            # A key lookup only (no path is built from it), so the digest's form, checked when
            # the snapshot was read, needs no second regular-expression match per file.
            record = blobs.get(file.digest.removeprefix("sha256:"))
            if record is None or record.size != file.size or not record.matches(found[file.path]):
                return False
        return True

    def installed_models(self) -> list[InstalledModel]:
        """Trees under ``models/`` (by listing the folders), with what the index says they hold."""
        index = self._loaded()
        result = []
        for name in _subdir_names(self.root):
            if name in RESERVED_NAMES or not _NAME.match(name):
                continue
            for version in _subdir_names(os.path.join(self.root, name)):
                if not _NAME.match(version):
                    continue
                model_id = f"{name}:{version}"
                entry = index.models.get(model_id)
                files = dict(entry["files"]) if entry else None
                path = self.root / name / version
                result.append(InstalledModel(model_id=model_id, path=path, files=files))
        return result

    def states(self, models: Sequence[ModelSpec]) -> list[ModelStatus]:
        """The state of each model of a snapshot, then Inactive for other installed trees."""
        index = self._loaded()
        result = []
        for model in models:
            if self.is_installed(model):
                result.append(ModelStatus(model.id, ModelState.ACTIVE))
                continue
            failures = [
                (f, index.failures[_hex(f.digest)])
                for f in model.files
                if _hex(f.digest) in index.failures
            ]
            bad = [(f, e) for f, e in failures if e.kind == "verification"]
            if bad:
                file, failure = bad[0]
                result.append(
                    ModelStatus(model.id, ModelState.FAILED, f"{file.path}: {failure.reason}")
                )
            elif failures:
                file, failure = failures[0]
                result.append(
                    ModelStatus(model.id, ModelState.PENDING, f"{file.path}: {failure.reason}")
                )
            else:
                result.append(ModelStatus(model.id, ModelState.PENDING))
        wanted = {m.id for m in models}
        for installed in self.installed_models():
            if installed.model_id not in wanted:
                result.append(ModelStatus(installed.model_id, ModelState.INACTIVE))
        return result

    # -------------------------------------------------------------- changes

    def ensure(
        self,
        models: Sequence[ModelSpec],
        *,
        client: httpx.Client | None,
        base_url: str | None,
        concurrency: int = 4,
        progress_reporter: ProgressReporter | None = None,
        reserve_bytes: int = 0,
        cancel: threading.Event | None = None,
    ) -> EnsureReport:
        """Make every model installed: fetch what is missing, then build or repair trees.

        Converged, it returns after ``is_installed`` on each model (no blob opened). With
        ``client=None`` (offline) it contacts nothing: it installs what the blobs on disk
        allow and returns the rest as ``missing``. Online, a failed fetch still installs the
        models that are complete, then raises (``DiskSpaceError``, ``HashMismatchError`` or
        ``DownloadError``).
        """
        _check_models(models)
        todo = [m for m in models if not self.is_installed(m)]
        if not todo:
            return EnsureReport(changed=(), missing=())
        error: ReconcilerError | None = None
        if client is not None:
            try:
                self.fetch(
                    todo,
                    client=client,
                    base_url=base_url,
                    concurrency=concurrency,
                    progress_reporter=progress_reporter,
                    reserve_bytes=reserve_bytes,
                    cancel=cancel,
                )
            except (DownloadError, DiskSpaceError) as exc:
                error = exc
        missing = self.missing_blobs(todo)
        absent = {f.digest for f in missing}
        changed = []
        for model in todo:
            if absent.isdisjoint(f.digest for f in model.files) and self.install(model):
                changed.append(model.id)
        if error is not None:
            raise error
        return EnsureReport(changed=tuple(changed), missing=tuple(missing))

    def fetch(
        self,
        models: Sequence[ModelSpec],
        *,
        client: httpx.Client,
        base_url: str | None,
        concurrency: int = 4,
        progress_reporter: ProgressReporter | None = None,
        reserve_bytes: int = 0,
        cancel: threading.Event | None = None,
    ) -> list[str]:
        """Download every missing blob of ``models`` (each digest once), ``concurrency`` at a
        time; return the digests fetched. Checks space first (nothing changes if it does not
        fit). Every file is attempted; then the first disk-full error, else a summary
        ``HashMismatchError`` if any file's bytes were wrong, else a ``DownloadError``."""
        _check_models(models)
        missing = self.missing_blobs(models)
        if not missing:
            return []
        self.check_space(sum(self._still_to_download(f) for f in missing), reserve_bytes)
        for folder in (self.blob_dir, self.partial_dir):
            folder.mkdir(parents=True, exist_ok=True)
        _same_filesystem(self.partial_dir, self.blob_dir)
        labels = _labels(models)
        # Our own flag, so that a disk-full stop never looks like the caller's cancel.
        disk_full = threading.Event()

        def should_stop() -> bool:
            return disk_full.is_set() or (cancel is not None and cancel.is_set())

        reporter = progress_reporter
        if reporter is not None:
            reporter.start(total_bytes=sum(f.size for f in missing), total_files=len(missing))

        def one(file: ModelFile) -> ReconcilerError | None:
            label = labels[file.digest]
            if should_stop():
                return DownloadError(f"cannot download {label}: cancelled")
            advance = reporter.file_started(label, file.size) if reporter else None
            try:
                self._download(
                    file,
                    client=client,
                    base_url=base_url,
                    label=label,
                    progress=advance,
                    should_stop=should_stop,
                )
            except ReconcilerError as exc:
                if isinstance(exc, DiskSpaceError):
                    disk_full.set()  # the other downloads would only fill the disk further
                if reporter:
                    reporter.file_finished(label, ok=False, reason=exc.one_line())
                return exc
            if reporter:
                reporter.file_finished(label, ok=True)
            return None

        try:
            with (
                self._saving_on_return(),
                ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="fetch") as pool,
            ):
                outcomes = list(pool.map(one, missing))
        finally:
            if reporter is not None:
                reporter.finish()
        errors = [e for e in outcomes if e is not None]
        if not errors:
            return [f.digest for f in missing]
        raise _summarise(errors, total=len(missing))

    def install(self, model: ModelSpec) -> bool:
        """Make ``models/<name>/<version>`` hold exactly the model's files as hard links to
        verified blobs. A new tree is built aside and renamed into place; an existing one is
        repaired file by file (each by an atomic rename), so a running container that
        mounts it sees the repaired files. Returns True when anything changed."""
        _check_models([model])
        if self.is_installed(model):
            return False
        with self._saving_on_return():
            absent = [f for f in model.files if not self._blob_ok(f.digest)]
        if absent:
            raise BlobsMissingError(
                f"cannot install {model.id}: {len(absent)} file(s) not fetched "
                f"(first: {absent[0].path})"
            )
        tree = self.tree_path(model)
        try:
            if _is_real_dir(tree):
                self._repair_tree(model, tree)
            else:
                self._build_tree(model, tree)
        except OSError as exc:
            raise _os_error(exc, f"installing {model.id}") from exc
        with self._lock:
            index = self._loaded()
            index.models[model.id] = {
                "files": {f.path: f.digest for f in model.files},
                "installed_at": format_time(time.time()),
            }
            self._save(index)
        return True

    def remove(self, model_id: str) -> bool:
        """Remove a model's tree (its final name disappears at once). Blobs stay until ``gc``.
        Returns False if it was not installed."""
        name, _, version = model_id.partition(":")
        if not _NAME.match(name) or not _NAME.match(version) or name in RESERVED_NAMES:
            raise ModelLayoutError(f"not a model id: {model_id!r}")
        tree = self.root / name / version
        existed = tree.exists() or tree.is_symlink()
        if existed:
            try:
                self._discard(tree)
                with contextlib.suppress(OSError):
                    (self.root / name).rmdir()
            except OSError as exc:
                raise _os_error(exc, f"removing {model_id}") from exc
        with self._lock:
            index = self._loaded()
            if index.models.pop(model_id, None) is not None or existed:
                self._save(index)
        return existed

    def gc(self, keep: set[str]) -> GcReport:
        """Delete blobs that no installed tree links to (link count 1) and whose digest is
        not in ``keep``; partial downloads not in ``keep``; leftovers of interrupted builds.

        ``keep`` must hold every digest of the snapshot being applied (a blob fetched but
        not yet linked has a link count of 1) and of the snapshots kept for rollback. Fetch
        failures of digests outside ``keep`` are forgotten."""
        keep_hex = {_hex(d) for d in keep}
        removed = freed = 0
        with self._lock:
            index = self._loaded()
            try:
                for blob in _files(self.blob_dir):
                    try:
                        st = blob.lstat()
                    except FileNotFoundError:
                        continue
                    linked = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
                    if blob.name in keep_hex or linked:
                        continue
                    blob.unlink(missing_ok=True)
                    index.blobs.pop(blob.name, None)
                    removed += 1
                    freed += st.st_size
                for partial in _files(self.partial_dir):
                    if partial.name not in keep_hex:
                        partial.unlink(missing_ok=True)
            except OSError as exc:
                raise _os_error(exc, "removing unused model blobs") from exc
            for leftover in (self.build_dir, self.trash_dir):
                shutil.rmtree(leftover, ignore_errors=True)
            index.failures = {k: v for k, v in index.failures.items() if k in keep_hex}
            index.blobs = {k: v for k, v in index.blobs.items() if (self.blob_dir / k).exists()}
            installed = {m.model_id for m in self.installed_models()}
            index.models = {k: v for k, v in index.models.items() if k in installed}
            if self.root.is_dir():
                self._save(index)
        if removed:
            _log.info("removed %d unused model blob(s), %s", removed, format_bytes(freed))
        return GcReport(removed_blobs=removed, freed_bytes=freed)

    def verify_all(self, *, repair: bool = True) -> list[BadFile]:
        """Hash every blob and every installed tree file again, ignoring the index. Each bad
        file is reported and a bad blob loses its verified record (the next ``is_installed``
        is False, the next fetch hashes it again); with ``repair`` it is also deleted, so the
        next apply fetches and links it again (the model shows Pending meanwhile)."""
        bad: list[BadFile] = []
        good_inodes: dict[int, str] = {}
        bad_inodes: set[int] = set()
        with self._lock:
            index = self._loaded()
            for blob in sorted(_files(self.blob_dir)):
                problem = self._verify_blob_file(blob, index, good_inodes, bad_inodes)
                if problem is not None:
                    # Forget it was ever verified, repair or not: otherwise the cheap stat check
                    # would keep trusting a blob whose bytes rotted under an unchanged stat.
                    index.blobs.pop(blob.name, None)
                    if repair:
                        blob.unlink(missing_ok=True)
                    bad.append(BadFile(blob, f"sha256:{blob.name}", problem, repaired=repair))
            for installed in self.installed_models():
                bad.extend(self._verify_tree(installed, good_inodes, bad_inodes, repair=repair))
            if self.root.is_dir():
                self._save(index)
        return bad

    # ----------------------------------------------------------- internals

    def _loaded(self) -> _Index:
        with self._lock:
            if self._index is None:
                self._index = _Index.load(self.root / INDEX_NAME)
            return self._index

    def _blob_ok(self, digest: str) -> bool:
        """True if the blob exists and is verified; a blob whose stat changed is hashed
        again, and deleted if its bytes are wrong."""
        hex_ = _hex(digest)
        blob = self.blob_dir / hex_
        try:
            st = blob.lstat()
        except FileNotFoundError:
            return False
        index = self._loaded()
        record = index.blobs.get(hex_)
        if record is not None and record.matches(st):
            return True
        with self._lock:
            problem = self._verify_blob_file(blob, index, {}, set())
            if problem is None:
                self._changed(index)
                return True
            _log.warning("model blob %s is damaged (%s); deleting it", blob, problem)
            with contextlib.suppress(FileNotFoundError):
                blob.unlink()
            index.blobs.pop(hex_, None)
            self._save(index)
            return False

    def _changed(self, index: _Index) -> None:
        """Note a newly verified blob in ``index``; save it if the last save is a second old.
        Callers run inside ``_saving_on_return``, which saves the rest. Losing unsaved records
        to a crash costs a re-hash of those blobs on the next pass, never a wrong answer: a
        blob the index does not vouch for is hashed before it is used."""
        self._unsaved = True
        if time.monotonic() - self._saved_at >= INDEX_SAVE_EVERY_S:
            self._save(index)

    def _save(self, index: _Index) -> None:
        # The blobs' new names are made durable first, so that the index never records a blob
        # a power cut could take back.
        if self.blob_dir.is_dir():
            fsync_dir(self.blob_dir)
        index.save()
        self._unsaved = False
        self._saved_at = time.monotonic()

    @contextlib.contextmanager
    def _saving_on_return(self) -> Iterator[None]:
        try:
            yield
        finally:
            with self._lock:
                if self._unsaved:
                    self._save(self._loaded())

    def _verify_blob_file(
        self,
        blob: Path,
        index: _Index,
        good_inodes: dict[int, str],
        bad_inodes: set[int],
    ) -> str | None:
        """Hash one blob; record it if good. The problem, or None."""
        if not _HEX.match(blob.name):
            return "not a blob name (sha256 hex)"
        try:
            st = blob.lstat()
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file"
            got = self._hash_file(blob)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if got != blob.name:
            bad_inodes.add(st.st_ino)
            return f"digest mismatch (sha256:{got[:16]}…)"
        good_inodes[st.st_ino] = blob.name
        index.blobs[blob.name] = _BlobRecord(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            inode=st.st_ino,
            verified_at=format_time(time.time()),
        )
        return None

    def _verify_tree(
        self,
        installed: InstalledModel,
        good_inodes: dict[int, str],
        bad_inodes: set[int],
        *,
        repair: bool,
    ) -> list[BadFile]:
        if installed.files is None:
            return [
                BadFile(
                    installed.path,
                    "",
                    "installed tree without a record of its files; cannot verify",
                    repaired=False,
                )
            ]
        bad = []
        for rel, digest in sorted(installed.files.items()):
            path = installed.path / rel
            problem = self._verify_tree_file(path, _hex(digest), good_inodes, bad_inodes)
            if problem is None:
                continue
            fixable = repair and problem != "missing"
            if fixable:
                _remove_entry(path)
            bad.append(BadFile(path, digest, problem, repaired=fixable))
        for rel in sorted(set(_walk_tree(installed.path) or {}) - set(installed.files)):
            # A runtime may load every file it finds (all *.safetensors): strays matter.
            if repair:
                _remove_entry(installed.path / rel)
            bad.append(BadFile(installed.path / rel, "", "not part of the model", repaired=repair))
        return bad

    def _verify_tree_file(
        self, path: Path, want: str, good_inodes: dict[int, str], bad_inodes: set[int]
    ) -> str | None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_ino in good_inodes:
            if good_inodes[st.st_ino] == want:
                return None
            return f"links the blob of sha256:{good_inodes[st.st_ino][:16]}…"
        if st.st_ino in bad_inodes:
            return "digest mismatch (shares a damaged blob)"
        try:
            got = self._hash_file(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if got != want:
            bad_inodes.add(st.st_ino)
            return f"digest mismatch (sha256:{got[:16]}…)"
        good_inodes[st.st_ino] = got
        return None

    def _hash_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        total = 0
        with path.open("rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
                total += count
        with self._lock:
            self.files_hashed += 1
            self.bytes_hashed += total
        return digest.hexdigest()

    def _still_to_download(self, file: ModelFile) -> int:
        try:
            have = (self.partial_dir / _hex(file.digest)).stat().st_size
        except OSError:
            have = 0
        return file.size - have if have <= file.size else file.size

    def _download(
        self,
        file: ModelFile,
        *,
        client: httpx.Client,
        base_url: str | None,
        label: str,
        progress: Callable[[int], None] | None,
        should_stop: Callable[[], bool],
    ) -> None:
        hex_ = _hex(file.digest)
        partial = self.partial_dir / hex_
        try:
            download_file(
                client,
                urls=file.urls,
                base_url=base_url,
                dest_partial=partial,
                size=file.size,
                digest=file.digest,
                progress=progress,
                deadline_s=deadline_for(file.size),
                label=label,
                should_stop=should_stop,
            )
        except HashMismatchError as exc:
            self._record_failure(hex_, "verification", exc)
            raise
        except DownloadError as exc:
            self._record_failure(hex_, "download", exc)
            raise
        try:
            self._adopt(partial, hex_)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise _os_error(exc, f"storing {label}") from exc

    def _adopt(self, partial: Path, hex_: str) -> None:
        """Give a verified partial file its final blob name, and remember it as verified."""
        partial.chmod(0o444)
        blob = self.blob_dir / hex_
        os.replace(partial, blob)  # the directory is synced before the index records it
        st = blob.lstat()
        with self._lock:
            index = self._loaded()
            index.blobs[hex_] = _BlobRecord(
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                inode=st.st_ino,
                verified_at=format_time(time.time()),
            )
            index.failures.pop(hex_, None)
            self._changed(index)

    def _record_failure(self, hex_: str, kind: str, exc: ReconcilerError) -> None:
        with self._lock:
            index = self._loaded()
            index.failures[hex_] = _Failure(
                kind=kind, reason=exc.one_line(), at=format_time(time.time())
            )
            if self.root.is_dir():
                self._changed(index)

    def _build_tree(self, model: ModelSpec, tree: Path) -> None:
        if tree.exists() or tree.is_symlink():
            self._discard(tree)  # a file or symlink squatting on the tree's name
        self.build_dir.mkdir(parents=True, exist_ok=True)
        _same_filesystem(self.build_dir, self.blob_dir)
        aside = Path(tempfile.mkdtemp(prefix=f"{model.name}@{model.version}.", dir=self.build_dir))
        try:
            for file in model.files:
                target = aside / file.path
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(self.blob_dir / _hex(file.digest), target)
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

    def _repair_tree(self, model: ModelSpec, tree: Path) -> None:
        found = _walk_tree(tree) or {}
        wanted = {f.path: f for f in model.files}
        index = self._loaded()
        for rel in sorted(set(found) - set(wanted), reverse=True):
            _log.warning("removing unexpected file %s from model %s", rel, model.id)
            _remove_entry(tree / rel)
        for rel, file in wanted.items():
            st = found.get(rel)
            record = index.blobs.get(_hex(file.digest))
            if st is not None and record is not None and record.matches(st):
                continue
            target = tree / rel
            _make_real_dirs(tree, target.parent)
            if _is_real_dir(target):
                shutil.rmtree(target)
            scratch = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            os.link(self.blob_dir / _hex(file.digest), scratch)
            os.replace(scratch, target)
            _log.info("repaired %s in model %s", rel, model.id)
        _prune_empty_dirs(tree, keep={str(Path(p).parent) for p in wanted})
        fsync_dir(tree)

    def _discard(self, path: Path) -> None:
        """Make ``path`` disappear at once (rename into the trash), then delete it."""
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        doomed = self.trash_dir / f"{path.name}.{secrets.token_hex(6)}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------- helpers


def _hex(digest: str) -> str:
    match = _DIGEST.match(digest)
    if match is None:
        raise ModelLayoutError(f"not a sha256 digest: {digest!r}")
    return match.group(1)


def _unique_files(models: Iterable[ModelSpec]) -> Iterator[ModelFile]:
    seen: set[str] = set()
    for model in models:
        for file in model.files:
            if file.digest not in seen:
                seen.add(file.digest)
                yield file


def _labels(models: Iterable[ModelSpec]) -> dict[str, str]:
    """A readable name per digest: the first ``<model id>/<path>`` that uses it."""
    labels: dict[str, str] = {}
    for model in models:
        for file in model.files:
            labels.setdefault(file.digest, f"{model.id}/{file.path}")
    return labels


def _check_models(models: Iterable[ModelSpec]) -> None:
    """Names and paths safe to lay out (the schema checks them too; this is the last line),
    and one size per digest (a blob cannot be two sizes)."""
    sizes: dict[str, int] = {}
    for model in models:
        for part in (model.name, model.version):
            if not _NAME.match(part):
                raise ModelLayoutError(f"model {model.id}: {part!r} is not a valid name")
        if model.name in RESERVED_NAMES:
            raise ModelLayoutError(f"model {model.id}: the name {model.name!r} is reserved")
        for file in model.files:
            _hex(file.digest)
            if sizes.setdefault(file.digest, file.size) != file.size:
                raise ModelLayoutError(
                    f"model {model.id}: {file.path} declares {file.size} bytes for a digest "
                    f"declared elsewhere with {sizes[file.digest]}"
                )
            parts = file.path.split("/")
            if (
                file.path.startswith("/")
                or "\\" in file.path
                or "\0" in file.path
                or any(p in ("", ".", "..") for p in parts)
            ):
                raise ModelLayoutError(f"model {model.id}: unsafe file path {file.path!r}")


def _summarise(errors: list[ReconcilerError], *, total: int) -> ReconcilerError:
    """One error for a fetch: disk full first, else wrong bytes, else transport."""
    by_blame: list[list[ReconcilerError]] = [
        [e for e in errors if isinstance(e, DiskSpaceError)],
        [e for e in errors if isinstance(e, HashMismatchError)],
        errors,
    ]
    first = next(group for group in by_blame if group)[0]
    if len(errors) == 1:
        return first
    text = f"{len(errors)} of {total} model files failed; first: {first.one_line()}"
    if isinstance(first, DiskSpaceError):
        return DiskSpaceError(text)
    if isinstance(first, HashMismatchError):
        return HashMismatchError(text)
    return DownloadError(text)


def _os_error(exc: OSError, doing: str) -> ReconcilerError:
    if exc.errno in _NO_SPACE:
        return DiskSpaceError(f"disk full while {doing}")
    return TransientError(f"{doing} failed: {exc.strerror or exc}")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_filesystem(a: Path, b: Path) -> None:
    if a.stat().st_dev != b.stat().st_dev:
        raise ModelLayoutError(
            f"{a} and {b} are on different filesystems; the work folder must share the "
            "models' filesystem so that verified files are renamed, not copied"
        )


def _is_real_dir(path: str | Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _subdir_names(path: str | Path) -> list[str]:
    """Names of the real directories in ``path``, sorted (as their paths would sort)."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _files(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _walk_tree(tree: str | Path) -> dict[str, os.stat_result] | None:
    """Relative path → lstat of every non-directory entry under ``tree`` (symlinks are
    entries, never followed); None if ``tree`` is not a real directory."""
    if not _is_real_dir(tree):
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


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Build many small objects without the cyclic garbage collector running in between.

    Loading the index of a large store makes two objects per file; each collection the
    allocations trigger walks the whole growing heap, which made loading 100,000 records
    take 25 times as long as 10,000 (measured, bench/plan.py). Nothing built here forms a
    reference cycle, so pausing the collector frees nothing later than it would have.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _remove_entry(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
