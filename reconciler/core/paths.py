"""Where things live under the node's state folder (docs/contract.md §4). Pure: names, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BLOB_MODE",
    "NODE_KEY_MODE",
    "RUNTIME_DIR_MODE",
    "RUNTIME_FILE_MODE",
    "STATE_DIR_GROUP_MODE",
    "STATE_DIR_MODE",
    "NodePaths",
]

# The modes the agent gives what it writes (docs/security.md); `init` sets them and
# `verify` reports drift from them.
STATE_DIR_MODE = 0o700  # nobody but the agent reads the node's state ...
STATE_DIR_GROUP_MODE = 0o750  # ... or, with the `state_group` setting, that group reads it
NODE_KEY_MODE = 0o600
RUNTIME_DIR_MODE = 0o755  # runtime containers read it (mounted read-only); only the agent writes
RUNTIME_FILE_MODE = 0o644  # as disk.atomic writes them
BLOB_MODE = 0o444  # a runtime's bug cannot corrupt a blob through its read-only mount


@dataclass(frozen=True)
class NodePaths:
    state_dir: Path

    @property
    def repo(self) -> Path:
        """The git repository of accepted snapshots (the audit trail)."""
        return self.state_dir / "snapshots"

    @property
    def models(self) -> Path:
        return self.state_dir / "models"

    @property
    def runtime(self) -> Path:
        """Files the runtime containers read: jobs.json, participation.json, env, …"""
        return self.state_dir / "runtime"

    @property
    def work(self) -> Path:
        """Scratch space for partial downloads and trees being built; same filesystem."""
        return self.state_dir / "work"

    @property
    def node_key(self) -> Path:
        return self.state_dir / "node.key"

    @property
    def node_pub(self) -> Path:
        return self.state_dir / "node.pub"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    @property
    def node_state(self) -> Path:
        """Small JSON record of what git history must not be able to lower (serial, quarantine…)."""
        return self.state_dir / "node-state.json"

    @property
    def jobs_file(self) -> Path:
        return self.runtime / "jobs.json"
