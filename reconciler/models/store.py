"""The node's model files: a content-addressed blob store and the trees runtimes mount.

Where it sits: the first step of an apply. Before any container changes, the apply asks the
store for the models of the snapshot (``ensure``, or ``missing_blobs`` → ``check_space`` →
``fetch`` → ``install``); after the containers converged it prunes (``remove``, ``gc``).
``reconcile verify`` calls ``verify_all``; ``status`` calls ``states``; ``plan`` and
``once --offline`` use ``missing_blobs``, which contacts nothing.

``ModelStore`` is the one door callers outside ``reconciler.models`` use; it composes the
store's parts, which share one ``Index``:

* ``layout`` — the folders (docs/contract.md §4) and what names and paths may be laid out;
* ``index`` — ``models/.index.json``: the verified blobs, fetch failures, installed trees;
* ``blobs`` — ``blobs/sha256/<hex>``: verify a blob against its digest, adopt a download;
* ``fetcher`` — the space check and the threaded downloads of missing blobs;
* ``trees`` — build or repair the hard-linked trees, ``is_installed``;
* ``retention`` — remove a model's tree, collect unused blobs;
* ``audit`` — hash everything again (``verify_all``); ``states`` — Pending/Active/….

Partial downloads and trees being built live under ``paths.work``, on the same filesystem,
and reach a final name only by ``rename`` once every byte is verified: a reader never sees a
half-written blob or a half-built tree. A blob shared by models or versions is stored and
downloaded once. A converged node costs one ``lstat`` per file and a directory walk per tree;
no blob is opened (``files_hashed`` counts the files this store read to hash them).

What it may not do: contact anything except through ``reconciler.models.download`` (and,
with the ``p2p`` setting on, the BitTorrent swarm of ``reconciler.models.swarm``) during
``fetch``/``ensure``; write outside ``paths.models`` and ``paths.work``; follow a symlink
inside a tree; leave an exception of the standard library's unmapped where a project error
says more (disk full → ``DiskSpaceError``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.core.errors import DiskSpaceError, DownloadError, ReconcilerError
from reconciler.core.paths import NodePaths
from reconciler.models.audit import BadFile, audit
from reconciler.models.blobs import BlobFolder
from reconciler.models.fetcher import Fetcher
from reconciler.models.index import Index
from reconciler.models.layout import INDEX_NAME, ModelLayoutError, StoreLayout, check_models
from reconciler.models.limits import DownloadLimits
from reconciler.models.progress import ProgressReporter
from reconciler.models.retention import GcReport, collect_garbage, remove_model
from reconciler.models.states import ModelState, ModelStatus, model_states
from reconciler.models.trees import BlobsMissingError, InstalledModel, Trees

__all__ = [
    "INDEX_NAME",
    "BadFile",
    "BlobsMissingError",
    "DownloadLimits",
    "EnsureReport",
    "GcReport",
    "InstalledModel",
    "ModelLayoutError",
    "ModelState",
    "ModelStatus",
    "ModelStore",
]


@dataclass(frozen=True)
class EnsureReport:
    changed: tuple[str, ...]  # model ids whose tree was created or repaired by this call
    missing: tuple[ModelFile, ...]  # offline only: blobs that would have to be fetched


class ModelStore:
    """See the module docstring. One store per process; its methods are not meant to be
    called concurrently except that ``fetch`` runs its own worker threads."""

    def __init__(self, paths: NodePaths) -> None:
        self.paths = paths
        self.root = paths.models
        self._layout = StoreLayout.of(paths)
        self._index = Index(self._layout)
        self._blobs = BlobFolder(self._layout, self._index)
        self._trees = Trees(self._layout, self._index, self._blobs)
        self._fetcher = Fetcher(self._layout, self._index, self._blobs)

    @property
    def files_hashed(self) -> int:
        """Files opened and hashed by this store (not downloads)."""
        return self._blobs.files_hashed

    @property
    def bytes_hashed(self) -> int:
        return self._blobs.bytes_hashed

    def tree_path(self, model: ModelSpec) -> Path:
        return self._trees.path(model)

    # -------------------------------------------------------- cheap queries

    def missing_blobs(self, models: Iterable[ModelSpec]) -> list[ModelFile]:
        """Files to download for ``models``, one per digest, in snapshot order. Contacts
        nothing; hashes only blobs whose stat differs from what was verified."""
        return self._blobs.missing(models)

    def bytes_needed(self, models: Iterable[ModelSpec]) -> int:
        """Bytes still to download for ``models`` (partial downloads already count as done)."""
        return self._fetcher.bytes_needed(models)

    def check_space(self, needed: int, reserve_bytes: int) -> None:
        """Raise ``DiskSpaceError`` (one line) unless ``needed`` bytes fit and leave
        ``reserve_bytes`` free. Changes nothing."""
        self._fetcher.check_space(needed, reserve_bytes)

    def is_installed(self, model: ModelSpec) -> bool:
        """True when the tree holds exactly the model's files, each the verified blob.
        Costs a walk of the tree and one lstat per file; opens nothing."""
        return self._trees.is_installed(model)

    def installed_models(self) -> list[InstalledModel]:
        """Trees under ``models/`` (by listing the folders), with what the index says they hold."""
        return self._trees.installed()

    def states(self, models: Sequence[ModelSpec]) -> list[ModelStatus]:
        """The state of each model of a snapshot, then Inactive for other installed trees."""
        return model_states(models, index=self._index, trees=self._trees)

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
        limits: DownloadLimits | None = None,
    ) -> EnsureReport:
        """Make every model installed: fetch what is missing, then build or repair trees.

        Converged, it returns after ``is_installed`` on each model (no blob opened). With
        ``client=None`` (offline) it contacts nothing: it installs what the blobs on disk
        allow and returns the rest as ``missing``. Online, a failed fetch still installs the
        models that are complete, then raises (``DiskSpaceError``, ``HashMismatchError`` or
        ``DownloadError``).
        """
        check_models(models)
        todo = [m for m in models if not self._trees.is_installed(m)]
        if not todo:
            return EnsureReport(changed=(), missing=())
        error: ReconcilerError | None = None
        if client is not None:
            try:
                self._fetcher.fetch_blobs(
                    todo,
                    client=client,
                    base_url=base_url,
                    concurrency=concurrency,
                    progress_reporter=progress_reporter,
                    reserve_bytes=reserve_bytes,
                    cancel=cancel,
                    limits=limits,
                )
            except (DownloadError, DiskSpaceError) as exc:
                error = exc
        missing = self._blobs.missing(todo)
        absent = {f.digest for f in missing}
        changed = []
        for model in todo:
            if absent.isdisjoint(f.digest for f in model.files) and self._trees.install(model):
                changed.append(model.id)
        if error is not None:
            raise error
        return EnsureReport(changed=tuple(changed), missing=tuple(missing))

    def fetch_blobs(
        self,
        models: Sequence[ModelSpec],
        *,
        client: httpx.Client,
        base_url: str | None,
        concurrency: int = 4,
        progress_reporter: ProgressReporter | None = None,
        reserve_bytes: int = 0,
        cancel: threading.Event | None = None,
        limits: DownloadLimits | None = None,
    ) -> list[str]:
        """Download every missing blob of ``models`` (each digest once), ``concurrency`` files
        over 4 MiB at a time and smaller ones up to ``limits.connections`` at a time; return
        the digests fetched. Checks space first (nothing changes if it does not
        fit). Every file is attempted; then the first disk-full error, else a summary
        ``HashMismatchError`` if any file's bytes were wrong, else a ``DownloadError``.
        ``limits`` (default ``DownloadLimits()``; the node's come from
        ``DownloadLimits.of(settings)``) caps the connections and splits large files."""
        check_models(models)
        return self._fetcher.fetch_blobs(
            models,
            client=client,
            base_url=base_url,
            concurrency=concurrency,
            progress_reporter=progress_reporter,
            reserve_bytes=reserve_bytes,
            cancel=cancel,
            limits=limits,
        )

    def install(self, model: ModelSpec) -> bool:
        """Make ``models/<name>/<version>`` hold exactly the model's files as hard links to
        verified blobs. A new tree is built aside and renamed into place; an existing one is
        repaired file by file (each by an atomic rename), so a running container that
        mounts it sees the repaired files. Returns True when anything changed."""
        check_models([model])
        return self._trees.install(model)

    def remove(self, model_id: str) -> bool:
        """Remove a model's tree (its final name disappears at once). Blobs stay until ``gc``.
        Returns False if it was not installed."""
        return remove_model(model_id, layout=self._layout, index=self._index, trees=self._trees)

    def gc(self, keep: set[str]) -> GcReport:
        """Delete blobs that no installed tree links to (link count 1) and whose digest is
        not in ``keep``; partial downloads not in ``keep``; leftovers of interrupted builds.

        ``keep`` must hold every digest of the snapshot being applied (a blob fetched but
        not yet linked has a link count of 1) and of the snapshots kept for rollback. Fetch
        failures of digests outside ``keep`` are forgotten."""
        return collect_garbage(keep, layout=self._layout, index=self._index, trees=self._trees)

    def verify_all(self, *, repair: bool = True) -> list[BadFile]:
        """Hash every blob and every installed tree file again, ignoring the index. Each bad
        file is reported and a bad blob loses its verified record (the next ``is_installed``
        is False, the next fetch hashes it again); with ``repair`` it is also deleted, so the
        next apply fetches and links it again (the model shows Pending meanwhile)."""
        return audit(index=self._index, blobs=self._blobs, trees=self._trees, repair=repair)
