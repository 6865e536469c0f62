"""``reconcile init``: settings file, state folder, state repository, trusted root, node key.

Edge module (files, git). Idempotent: running it again keeps the node key and the history and
rewrites only the settings; a root for another network is refused. Strict modes: the root
file, the settings file and the state folder are checked (``disk.strict``) before anything is
read or written, and ``init`` gives what it owns the modes of ``core.paths`` (state folder
0700, or 0750 for ``state_group``; ``node.key`` 0600; ``runtime/`` 0755; model blobs 0444),
so running it again is how an operator repairs the drift ``reconcile verify`` reports.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.config.settings import config_path, load_settings, write_settings_file
from reconciler.core.errors import RejectedError, SettingsError
from reconciler.core.paths import (
    BLOB_MODE,
    NODE_KEY_MODE,
    RUNTIME_DIR_MODE,
    RUNTIME_FILE_MODE,
    STATE_DIR_GROUP_MODE,
    STATE_DIR_MODE,
    NodePaths,
)
from reconciler.core.trust import verify_initial_root
from reconciler.disk.keys import generate_key
from reconciler.disk.strict import check_trusted, trusted_group
from reconciler.history.node import check_state_folder
from reconciler.history.repo import History
from reconciler.history.roots import RootChain
from reconciler.models.layout import StoreLayout

__all__ = ["InitSummary", "initialise"]


@dataclass(frozen=True)
class InitSummary:
    state_dir: Path
    network: str
    root_version: int
    public_key: str


def _root_network(data: bytes) -> str:
    from reconciler.core.documents import JsonError, loads_strict
    from reconciler.core.envelope import EnvelopeError, parse_envelope

    try:
        payload = loads_strict(parse_envelope(data).payload)
    except (EnvelopeError, JsonError) as exc:
        raise SettingsError(f"the root file is not a root envelope: {exc}") from exc
    network = payload.get("network") if isinstance(payload, dict) else None
    if network not in {"testnet", "mainnet"}:
        raise SettingsError("the root file names no network")
    return str(network)


def _set_modes(paths: NodePaths, *, group: str | None) -> None:
    """The modes of ``core.paths`` on what ``init`` owns; a second ``init`` repairs drift."""
    try:
        if group is not None:
            os.chown(paths.state_dir, -1, trusted_group(group, setting="state_group").gid)
        paths.state_dir.chmod(STATE_DIR_GROUP_MODE if group is not None else STATE_DIR_MODE)
        paths.runtime.mkdir(exist_ok=True)
        paths.runtime.chmod(RUNTIME_DIR_MODE)
        for path in paths.runtime.iterdir():
            if stat.S_ISREG(path.lstat().st_mode):
                path.chmod(RUNTIME_FILE_MODE)
        if paths.node_key.exists():
            paths.node_key.chmod(NODE_KEY_MODE)
        blobs = StoreLayout.of(paths).blob_dir
        for blob in blobs.iterdir() if blobs.is_dir() else ():
            if stat.S_ISREG(blob.lstat().st_mode):
                blob.chmod(BLOB_MODE)  # the inode is shared with the tree files: they follow
    except OSError as exc:
        raise SettingsError(f"cannot set the modes in {paths.state_dir}: {exc}") from exc


def initialise(
    *,
    config: str | None,
    overrides: dict[str, Any],
    origin: str,
    root_file: Path,
    network: str | None,
) -> tuple[Path, InitSummary]:
    check_trusted(root_file, what="root file")
    try:
        data = root_file.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read the root file {root_file}: {exc.strerror}") from exc
    network = network or _root_network(data)
    try:
        verified = verify_initial_root(data, network=network)
    except RejectedError as exc:
        raise SettingsError(exc.one_line()) from exc
    path, _explicit = config_path(config)
    settings = load_settings(config=str(path), overrides=overrides, allow_missing=True)
    paths = NodePaths(Path(settings.state_dir).resolve())
    settings = replace(
        settings,
        origin=origin,
        network=network,
        root=str(root_file.resolve()),
        state_dir=str(paths.state_dir),
    )
    check_state_folder(paths)  # what exists already, parents included, before any change
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    _set_modes(paths, group=settings.state_group)
    chain = RootChain(paths.state_dir / "roots", network=network)
    chain.install(data)
    History.open(paths.repo, create=True)
    if not paths.node_key.exists():
        generate_key(paths.node_key, paths.node_pub)
    write_settings_file(path, settings)
    public = paths.node_pub.read_text(encoding="ascii").strip()
    return path, InitSummary(paths.state_dir, network, verified.root.version, public)
