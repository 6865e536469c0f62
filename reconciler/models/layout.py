"""The model store's folders, and the rules for what may be laid out in them.

Where it sits: every part of the model store (``index``, ``blobs``, ``trees``, ``fetcher``,
``retention``, ``audit``) finds its folders through one ``StoreLayout``, and the store checks
each snapshot's models with ``check_models`` before anything is fetched or linked. Names and
paths reach the disk only once they passed here.

Layout (docs/contract.md §4), under ``paths.models``::

    blobs/sha256/<hex>           one file per digest, read-only, verified before it got its name
    <name>/<version>/<path>      installed trees: hard links to the blobs
    .index.json                  what was verified, and the last fetch failures (``index``)
    .mirrors.json                bytes and failed requests per mirror host (``mirrors``)

and under ``paths.work/models``: ``partial/<hex>`` (downloads, and ``<hex>.parts`` the record
of a segmented one), ``trees/`` (trees being built), ``trash/`` (trees being deleted): on the
same filesystem, so that everything reaches its final name by ``rename``.

What it may not do: write anything. It reads the disk only to compare filesystems and to find
where free space is counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.core.errors import DiskSpaceError, ReconcilerError, TransientError
from reconciler.core.paths import NodePaths
from reconciler.disk.atomic import is_disk_full

__all__ = [
    "INDEX_NAME",
    "RESERVED_NAMES",
    "ModelLayoutError",
    "StoreLayout",
    "blob_hex",
    "check_models",
    "digest_hex",
    "existing_ancestor",
    "is_blob_name",
    "is_layout_name",
    "os_failure",
    "parse_model_id",
    "same_filesystem",
    "unique_files",
]

INDEX_NAME = ".index.json"  # a leading dot: no model name can collide with it
MIRRORS_NAME = ".mirrors.json"
RESERVED_NAMES = frozenset({"blobs"})  # would collide with models/blobs/sha256/<hex>

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX = "[0-9a-f]{64}"
_DIGEST = re.compile(rf"^sha256:({_HEX})$")
_BLOB_NAME = re.compile(rf"^{_HEX}$")


class ModelLayoutError(TransientError):
    """A model cannot be laid out on disk (reserved name, unsafe or conflicting paths, or the
    work folder on another filesystem)."""


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """The store's folders for one node."""

    root: Path  # paths.models: the blobs, the installed trees and the index
    blob_dir: Path
    partial_dir: Path
    build_dir: Path
    trash_dir: Path
    index_path: Path
    mirrors_path: Path  # bytes and errors per mirror host, summed over every fetch (metrics)

    @classmethod
    def of(cls, paths: NodePaths) -> StoreLayout:
        work = paths.work / "models"
        return cls(
            root=paths.models,
            blob_dir=paths.models / "blobs" / "sha256",
            partial_dir=work / "partial",
            build_dir=work / "trees",
            trash_dir=work / "trash",
            index_path=paths.models / INDEX_NAME,
            mirrors_path=paths.models / MIRRORS_NAME,
        )


def is_layout_name(part: str) -> bool:
    """True if ``part`` may be a model's name or version (a folder under ``models/``)."""
    return _NAME.match(part) is not None


def digest_hex(digest: str) -> str | None:
    """The hex of ``sha256:<hex>``; None for anything else."""
    match = _DIGEST.match(digest)
    return None if match is None else match.group(1)


def blob_hex(digest: str) -> str:
    """The blob's file name for ``sha256:<hex>``; ``ModelLayoutError`` for anything else."""
    # The match itself rather than through ``digest_hex``: this runs once per file per pass.
    match = _DIGEST.match(digest)
    if match is None:
        raise ModelLayoutError(f"not a sha256 digest: {digest!r}")
    return match.group(1)


def is_blob_name(name: str) -> bool:
    """True if ``name`` can be a blob's file name (64 lowercase hex digits)."""
    return _BLOB_NAME.match(name) is not None


def parse_model_id(model_id: str) -> tuple[str, str]:
    """``<name>:<version>`` as the two folder names of its tree."""
    name, _, version = model_id.partition(":")
    if not is_layout_name(name) or not is_layout_name(version) or name in RESERVED_NAMES:
        raise ModelLayoutError(f"not a model id: {model_id!r}")
    return name, version


def check_models(models: Iterable[ModelSpec]) -> None:
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
            blob_hex(file.digest)
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


def unique_files(models: Iterable[ModelSpec]) -> Iterator[ModelFile]:
    """Every file of ``models``, the first one of each digest only, in snapshot order."""
    seen: set[str] = set()
    for model in models:
        for file in model.files:
            if file.digest not in seen:
                seen.add(file.digest)
                yield file


def same_filesystem(a: Path, b: Path) -> None:
    if a.stat().st_dev != b.stat().st_dev:
        raise ModelLayoutError(
            f"{a} and {b} are on different filesystems; the work folder must share the "
            "models' filesystem so that verified files are renamed, not copied"
        )


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent: where its free space is counted."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def os_failure(exc: OSError, doing: str) -> ReconcilerError:
    """A filesystem error of the store as the project error it means (disk full first)."""
    if is_disk_full(exc):
        return DiskSpaceError(f"disk full while {doing}")
    return TransientError(f"{doing} failed: {exc.strerror or exc}")
