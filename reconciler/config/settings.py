"""Node settings (docs/contract.md §4): defaults < settings file < environment < command-line flags.

Where it sits: first in the workflow; everything else receives a ``Settings`` value and never
reads the environment or the file itself. Reads the TOML file and the environment, nothing
else. A file that does not parse, or names an unknown key, is a ``SettingsError`` (exit 2)
with one line naming the key. Strict modes: the settings file, and the ``registry_auth_file``
it names, must not be writable by anyone but root or the agent's user (``disk.strict``), else
an ``UntrustedPathError`` (exit 2) before a byte of them is trusted.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from reconciler.core.errors import SettingsError
from reconciler.core.schema import SchemaError, validate
from reconciler.disk.atomic import write_atomic
from reconciler.disk.strict import check_trusted

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Settings",
    "config_path",
    "load_settings",
    "write_settings_file",
]

DEFAULT_CONFIG_PATH = Path("/etc/reconciler/config.toml")
DEFAULT_PODMAN_URL = "unix:///run/podman/podman.sock"


@dataclass(frozen=True)
class Settings:
    origin: str | None = None
    network: str | None = None
    root: str | None = None  # path of the trusted root envelope installed by the operator
    state_dir: str = "/var/lib/reconciler"
    podman_url: str | None = None  # else CONTAINER_HOST, else the rootful socket
    registry_auth_file: str | None = None
    mirror_auth_file: str | None = None  # credentials for model mirrors (containers-auth.json)
    hooks_dir: str = "/etc/reconciler/hooks"
    hook_timeout_s: float = 300.0  # seconds before a hook's process group is killed
    keep_applied: int = 2  # applied snapshots whose model blobs survive garbage collection
    disk_reserve_bytes: int = 1 << 30  # bytes that downloads must leave free
    download_concurrency: int = 4  # model files downloaded at once
    download_connections: int = 16  # HTTP connections open at once over every model file
    download_connections_per_file: int = 8  # the most one large file is split over
    download_memory_bytes: int = 64 << 20  # bytes a download may buffer beyond network reads
    local_mirrors: tuple[str, ...] = ()  # base URLs serving blobs/sha256/<hex>, tried first
    verify_interval_s: int = 0  # seconds between full model re-hashes; 0 = the snapshot's cache_s
    vram_mib: int | None = None  # this node's GPU memory; None = unknown (meets no VRAM floor)
    opt_out_subclouds: tuple[str, ...] = ()
    metrics_path: str | None = None  # Prometheus textfile; None = no metrics file
    # Where reports go (§9): None = the snapshot's reports.url, "" = never report.
    report_url: str | None = None
    log_format: str = "human"  # human | json
    fetch_timeout_s: float = 30.0  # seconds: overall deadline per origin document (addition)
    # Folders of CDI specs checked before a runtime with devices is created (§11, addition).
    cdi_spec_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    # Strict modes (disk.strict): a group whose members may write the hooks and their folder.
    strict_modes_group: str | None = None
    state_group: str | None = None  # may read the state folder (0750, for monitoring)
    # Agent releases (§10): install approved releases ourselves; never below this version;
    # seconds a release on trial has to complete its first converged cycle.
    self_update: bool = True
    agent_min_version: str = ""
    agent_settle_s: int = 600
    # Sharing model files over BitTorrent (docs/contract.md §12); off unless turned on.
    p2p: bool = False  # fetch files that carry ``bt`` from the swarm (web seeds = their mirrors)
    p2p_seed: bool = True  # while `watch` runs, offer the verified blobs of HEAD and retained
    p2p_listen: str = "0.0.0.0:6881"  # host:port the swarm listens on (port 0 = any free one)
    p2p_upload_rate: int = 0  # bytes/s uploaded at most; 0 = no limit
    p2p_connections: int = 200  # peer connections open at once
    p2p_peers: tuple[str, ...] = ()  # host:port of peers to connect to (besides discovery)
    p2p_lsd: bool = True  # local service discovery (multicast on the LAN)
    p2p_dht: bool = True  # the DHT, when the snapshot's p2p.dht allows it
    p2p_dht_bootstrap: tuple[str, ...] = ()  # host:port DHT nodes to join by; () = libtorrent's
    p2p_stall_s: float = 30.0  # seconds without a verified byte before falling back to HTTP

    @property
    def effective_podman_url(self) -> str:
        return self.podman_url or os.environ.get("CONTAINER_HOST") or DEFAULT_PODMAN_URL

    def normalised_origin(self) -> str | None:
        if self.origin is None:
            return None
        return self.origin if self.origin.endswith("/") else self.origin + "/"


_FIELDS = {f.name: f for f in fields(Settings)}
_SCHEMA_EXTRA = {"fetch_timeout_s"}  # documented additions validated here, not in the schema


def config_path(flag: str | None) -> tuple[Path, bool]:
    """The settings file to read and whether it was named explicitly (then it must exist)."""
    if flag:
        return Path(flag), True
    env = os.environ.get("RECONCILER_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def _read_file(path: Path, *, required: bool) -> dict[str, Any]:
    check_trusted(path, what="settings file")
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise SettingsError(f"settings file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from exc
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings file {path} does not parse: {exc}") from exc


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, spec in _FIELDS.items():
        raw = environ.get(f"RECONCILER_{name.upper()}")
        if raw is None:
            continue
        kind = str(spec.type)
        try:
            if "bool" in kind:
                values[name] = _boolean(raw, name)
            elif "tuple" in kind:
                values[name] = [item.strip() for item in raw.split(",") if item.strip()]
            elif "float" in kind:
                values[name] = float(raw)
            elif "int" in kind:
                values[name] = int(raw)
            else:
                values[name] = raw
        except ValueError:
            raise SettingsError(f"RECONCILER_{name.upper()}={raw!r} is not a number") from None
    return values


def _boolean(raw: str, name: str) -> bool:
    word = raw.strip().lower()
    if word in {"1", "true", "yes", "on"}:
        return True
    if word in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"RECONCILER_{name.upper()}={raw!r} is neither true nor false")


def _check(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in _FIELDS:
            raise SettingsError(f"{source}: unknown setting {key!r}")
    extra = {k: v for k, v in values.items() if k in _SCHEMA_EXTRA}
    for key, value in extra.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise SettingsError(f"{source}: {key} must be a positive number")
    checked = {k: v for k, v in values.items() if k not in _SCHEMA_EXTRA}
    try:
        validate("settings", checked)
    except SchemaError as exc:
        raise SettingsError(f"{source}: {exc}") from exc


def load_settings(
    *,
    config: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    allow_missing: bool = False,
) -> Settings:
    """Merge default < file < ``RECONCILER_*`` env < flags, validating each layer."""
    environ = os.environ if environ is None else environ
    path, required = config_path(config)
    merged: dict[str, Any] = {}
    for source, layer in (
        (str(path), _read_file(path, required=required and not allow_missing)),
        ("environment", _from_env(environ)),
        ("command line", {k: v for k, v in (overrides or {}).items() if v is not None}),
    ):
        _check(layer, source)
        merged.update(layer)
    for key in ("opt_out_subclouds", "local_mirrors", "cdi_spec_dirs", "p2p_peers"):
        if key in merged:
            merged[key] = tuple(merged[key])
    if "p2p_dht_bootstrap" in merged:
        merged["p2p_dht_bootstrap"] = tuple(merged["p2p_dht_bootstrap"])
    if merged.get("registry_auth_file"):
        # Checked again at each read (runtime.registry_auth); here so that it is exit 2 at once.
        check_trusted(Path(merged["registry_auth_file"]), what="registry_auth_file")
    return replace(Settings(), **merged)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(str(value))


def write_settings_file(path: Path, settings: Settings) -> None:
    """Write the non-default settings as TOML, atomically."""
    defaults = asdict(Settings())
    lines = ["# reconciler node settings (written by `reconcile init`)"]
    for key, value in asdict(settings).items():
        if value is None or (value == defaults[key] and key not in {"state_dir"}):
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
