"""What the model store keeps and what it deletes: removing a model's tree, and the garbage
collection of blobs nothing links to any more.

Where it sits: the last step of an apply, after the containers converged: the apply removes
the trees of models no snapshot it keeps wants (``remove_model``), then collects the blobs and
partial downloads outside what it keeps (``collect_garbage``).

What it may not do: delete a blob an installed tree links (link count above 1) or whose digest
the caller keeps; the snapshot being applied and those kept for rollback are the caller's to
name in ``keep``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
from dataclasses import dataclass

from reconciler.models.blobs import file_entries
from reconciler.models.index import Index
from reconciler.models.layout import StoreLayout, blob_hex, os_failure, parse_model_id
from reconciler.models.progress import format_bytes
from reconciler.models.trees import Trees

__all__ = ["GcReport", "collect_garbage", "remove_model"]

_log = logging.getLogger("reconciler.modelstore")


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    freed_bytes: int


def remove_model(model_id: str, *, layout: StoreLayout, index: Index, trees: Trees) -> bool:
    """See ``ModelStore.remove``."""
    name, version = parse_model_id(model_id)
    tree = layout.root / name / version
    existed = tree.exists() or tree.is_symlink()
    if existed:
        try:
            trees.discard(tree)
            with contextlib.suppress(OSError):
                (layout.root / name).rmdir()
        except OSError as exc:
            raise os_failure(exc, f"removing {model_id}") from exc
    with index.lock:
        if index.contents().models.pop(model_id, None) is not None or existed:
            index.save()
    return existed


def collect_garbage(keep: set[str], *, layout: StoreLayout, index: Index, trees: Trees) -> GcReport:
    """See ``ModelStore.gc``."""
    keep_hex = {blob_hex(d) for d in keep}
    with index.lock:
        try:
            removed, freed = _remove_unlinked_blobs(layout, index, keep_hex=keep_hex)
            # ``partial/`` holds HTTP downloads, ``swarm/`` beside it BitTorrent ones.
            swarm = file_entries(layout.partial_dir.parent / "swarm")
            for partial in [*file_entries(layout.partial_dir), *swarm]:
                # ``<hex>.parts`` is the segment record of the partial ``<hex>``.
                if partial.name.partition(".")[0] not in keep_hex:
                    partial.unlink(missing_ok=True)
        except OSError as exc:
            raise os_failure(exc, "removing unused model blobs") from exc
        for leftover in (layout.build_dir, layout.trash_dir):
            shutil.rmtree(leftover, ignore_errors=True)
        contents = index.contents()
        contents.failures = {k: v for k, v in contents.failures.items() if k in keep_hex}
        contents.blobs = {k: v for k, v in contents.blobs.items() if (layout.blob_dir / k).exists()}
        installed = {m.model_id for m in trees.installed()}
        contents.models = {k: v for k, v in contents.models.items() if k in installed}
        index.save_if_store_exists()
    if removed:
        _log.info("removed %d unused model blob(s), %s", removed, format_bytes(freed))
    return GcReport(removed_blobs=removed, freed_bytes=freed)


def _remove_unlinked_blobs(
    layout: StoreLayout, index: Index, *, keep_hex: set[str]
) -> tuple[int, int]:
    """Delete blobs with a link count of 1 outside ``keep_hex``: (how many, bytes freed)."""
    removed = freed = 0
    blobs = index.contents().blobs
    for blob in file_entries(layout.blob_dir):
        try:
            st = blob.lstat()
        except FileNotFoundError:
            continue
        linked = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
        if blob.name in keep_hex or linked:
            continue
        blob.unlink(missing_ok=True)
        blobs.pop(blob.name, None)
        removed += 1
        freed += st.st_size
    return removed, freed
