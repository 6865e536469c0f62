"""The node's CDI spec files, read and parsed (docs/contract.md §11).

Where it sits: an I/O edge beside the Podman edge. ``apply.edges.NodeHost`` calls
``read_inventory`` once per pass with the ``cdi_spec_dirs`` setting; ``core.cdi`` validates each
document and decides which runtimes can be created. Podman reads the same folders itself when
it creates a container; this module only lets the agent know beforehand.

Files named ``*.yaml``, ``*.yml`` or ``*.json`` are read (what CDI tools write), each at most
``MAX_SPEC_BYTES``, and parsed with PyYAML's safe loader (JSON with the ``json`` module). A
file that cannot be read, does not parse or is not a valid spec is listed with why and defines
nothing; it never fails the pass. A missing folder is normal (no GPU, no toolkit). No PyYAML
exception leaves this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reconciler.core.cdi import CdiInventory, CdiSpec, CdiSpecError, parse_spec

__all__ = ["MAX_SPEC_BYTES", "read_inventory"]

log = logging.getLogger("reconciler")

MAX_SPEC_BYTES = 4 << 20  # nvidia-ctk's spec of an 8-GPU machine is a few tens of KiB
_SUFFIXES = (".yaml", ".yml", ".json")


def _parse(path: Path, data: bytes) -> Any:
    if path.suffix == ".json":
        return json.loads(data)
    return yaml.safe_load(data)


def _read_one(path: Path) -> CdiSpec:
    """The spec in ``path``; ``CdiSpecError`` (one line) when it is not a usable one."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise CdiSpecError(f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise CdiSpecError(f"is over {MAX_SPEC_BYTES} bytes")
    try:
        doc = _parse(path, data)
    except (yaml.YAMLError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CdiSpecError(f"does not parse: {first}") from None
    return parse_spec(doc, path=str(path), digest=hashlib.sha256(data).hexdigest())


def _spec_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cdi: cannot list %s: %s", folder, exc.strerror)
        return []
    return [Path(e.path) for e in entries if e.name.endswith(_SUFFIXES) and not e.is_dir()]


def read_inventory(dirs: Sequence[str]) -> CdiInventory:
    """Every spec in ``dirs`` (in that order, files by name), and the files that are unusable."""
    specs: list[CdiSpec] = []
    invalid: list[tuple[str, str]] = []
    for folder in dirs:
        for path in _spec_files(Path(folder)):
            try:
                specs.append(_read_one(path))
            except CdiSpecError as exc:
                invalid.append((str(path), str(exc)))
    return CdiInventory(dirs=tuple(dirs), specs=tuple(specs), invalid=tuple(invalid))
