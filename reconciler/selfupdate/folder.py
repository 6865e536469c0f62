"""``<state>/agent/``: release environments, downloaded wheels, and the release record.

Where it sits: under ``install`` and ``gate``, which change the record only through
``core.agentrelease`` transitions applied by ``AgentFolder.change`` (read, transform, write
atomically, all under ``agent/lock``), so a start, an install and a good mark never lose each
other's change. It may not download, run pip or exec anything.

Layout::

    agent/state.json                 the record (selected, previous, releases, base, events)
    agent/releases/<hex>/            one environment per release digest; ``.complete`` last
    agent/downloads/<hex>/<name>     verified wheels (the release's and its ``requires``)
    agent/work/                      partial downloads
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.agentrelease import AgentRecord
from reconciler.disk.atomic import write_atomic
from reconciler.disk.lock import state_lock

__all__ = ["COMPLETE_MARK", "RELEASE_ENV", "AgentFolder", "die_at"]

log = logging.getLogger("reconciler")

COMPLETE_MARK = ".complete"  # written last: an environment without it is half built
# Set by the start gate in the environment of the release it execs: the release's digest hex.
RELEASE_ENV = "RECONCILER_AGENT_RELEASE"

# The crash test seam of tests/test_self_update.py, as ``apply.crash`` has for the apply
# (the same variable; unset, nothing happens): SIGKILL at a named moment of a switch.
_CRASH_ENV = "RECONCILER_TEST_DIE_AT"
CRASH_POINTS = ("agent-installed", "agent-selected", "agent-counted")


def die_at(point: str) -> None:
    """SIGKILL this process at ``point`` when a test asks for it, as a power cut would."""
    if os.environ.get(_CRASH_ENV) == point:
        log.warning("%s=%s: killing this process", _CRASH_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class AgentFolder:
    root: Path  # <state>/agent

    @classmethod
    def of(cls, state_dir: Path) -> AgentFolder:
        return cls(state_dir / "agent")

    @property
    def record_file(self) -> Path:
        return self.root / "state.json"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def release_dir(self, hex_digest: str) -> Path:
        return self.root / "releases" / hex_digest

    def python(self, hex_digest: str) -> Path:
        return self.release_dir(hex_digest) / "bin" / "python"

    def download_dir(self, hex_digest: str) -> Path:
        return self.root / "downloads" / hex_digest

    def installed(self) -> set[str]:
        """Release environments that were completely built."""
        folder = self.root / "releases"
        if not folder.is_dir():
            return set()
        return {p.name for p in folder.iterdir() if (p / COMPLETE_MARK).is_file()}

    def read(self) -> AgentRecord:
        """The record; an absent or unreadable one is the empty record (the base runs)."""
        try:
            obj = json.loads(self.record_file.read_bytes())
            return AgentRecord.from_json(obj) if isinstance(obj, dict) else AgentRecord()
        except FileNotFoundError:
            return AgentRecord()
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("agent: %s is unreadable (%s); running the base install", self.root, exc)
            return AgentRecord()

    @contextmanager
    def locked(self) -> Iterator[None]:
        with state_lock(self.root / "lock", wait_s=30.0):
            yield

    def change(self, transition: Callable[[AgentRecord], AgentRecord]) -> AgentRecord:
        """Apply ``transition`` to the record under the lock and write the result durably."""
        with self.locked():
            before = self.read()
            after = transition(before)
            if after != before:
                data = json.dumps(after.to_json(), indent=2, sort_keys=True) + "\n"
                write_atomic(self.record_file, data.encode("utf-8"))
            return after

    def collect(self, keep: set[str]) -> list[str]:
        """Remove release environments and downloads outside ``keep``; the hexes removed."""
        removed = []
        for folder in (self.root / "releases", self.root / "downloads"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        return sorted(set(removed))
