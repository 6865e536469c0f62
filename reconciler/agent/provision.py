"""``reconcile init``: settings file, state folder, state repository, trusted root, node key.

Edge module (files, git). Idempotent: running it again keeps the node key and the history and
rewrites only the settings; a root for another network is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.config.settings import config_path, load_settings, write_settings_file
from reconciler.core.errors import RejectedError, SettingsError
from reconciler.core.paths import NodePaths
from reconciler.core.trust import verify_initial_root
from reconciler.disk.keys import generate_key
from reconciler.history.repo import History
from reconciler.history.roots import RootChain

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


def initialise(
    *,
    config: str | None,
    overrides: dict[str, Any],
    origin: str,
    root_file: Path,
    network: str | None,
) -> tuple[Path, InitSummary]:
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
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    chain = RootChain(paths.state_dir / "roots", network=network)
    chain.install(data)
    History.open(paths.repo, create=True)
    if not paths.node_key.exists():
        generate_key(paths.node_key, paths.node_pub)
    write_settings_file(path, settings)
    public = paths.node_pub.read_text(encoding="ascii").strip()
    return path, InitSummary(paths.state_dir, network, verified.root.version, public)
