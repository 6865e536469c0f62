"""What the next converged pass would do about the agent, for ``reconcile plan``: read-only.

Where it sits: ``apply.nodeplan.plan_agent`` calls it with HEAD's ``updates``, the settings
and what the node record says of the ``agent-update`` hook. It reads ``agent/state.json``
and looks at which environments and downloads are there; it never writes, downloads, hashes
or starts anything, and contacts nothing. The rules are the ones the pass applies: the start
gate's (``core.agentrelease.next_start``) first, then the installer's (``release_step``), so
the plan and the pass cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from reconciler import __version__
from reconciler.core.agentrelease import (
    MAX_STARTS,
    AgentRecord,
    AgentRelease,
    abandoned,
    base_seen,
    next_start,
    release_step,
    runtime_update_check,
)
from reconciler.selfupdate.folder import RELEASE_ENV, AgentFolder

__all__ = ["AgentPlan", "HookState", "agent_plan", "read_agent_plan"]

# The agent-update hook: not installed, installed and due for HEAD's release, or it ran for it.
HookState = Literal["absent", "due", "ran"]
# Actions that change the node on the next converged pass (what `plan --exit-code` counts).
_PENDING = frozenset({"install", "select", "select-base", "hook"})


@dataclass(frozen=True, kw_only=True)
class AgentPlan:
    """``action`` is one word for scripts; ``lines`` say it for people (each ``agent: …``)."""

    action: str
    version: str | None  # the release HEAD approves
    digest: str | None
    lines: tuple[str, ...]
    runtime_warning: str | None

    @property
    def pending(self) -> bool:
        return self.action in _PENDING

    def describe(self) -> list[str]:
        lines = [f"agent: {line}" for line in self.lines]
        if self.runtime_warning:
            lines.append(f"runtime update: {self.runtime_warning}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "version": self.version,
            "digest": self.digest,
            "pending": self.pending,
            "lines": list(self.lines),
            "runtime_warning": self.runtime_warning,
        }


def _name(record: AgentRecord, hex_digest: str | None) -> str:
    entry = record.entry(hex_digest)
    if hex_digest is None or entry is None:
        return f"the base install {record.base_version or __version__}"
    return f"release {entry.version}"


def _after_start(record: AgentRecord, installed: set[str]) -> tuple[AgentRecord, list[str]]:
    """The record as the next start leaves it (abandons included), and what it says."""
    said = []
    for _ in range(2 * MAX_STARTS + 2):  # as the gate: each round abandons one or settles
        decision = next_start(record, installed=installed)
        if decision.abandon is None:
            entry = record.entry(decision.run)
            if decision.trial and entry is not None:
                said.append(
                    f"release {entry.version} is on trial ({entry.starts} of {MAX_STARTS} "
                    "starts used); its first converged pass marks it good"
                )
            break
        gone = _name(record, record.selected)
        record = abandoned(record, at="", why=decision.abandon)
        said.append(
            f"{gone} is abandoned at the next start: {decision.abandon}; "
            f"{_name(record, record.selected)} runs instead"
        )
    return record, said


def _release_line(
    record: AgentRecord, release: AgentRelease, *, installed: set[str], downloaded: int
) -> tuple[str, str]:
    version, short = release.version, f"{release.digest[:19]}…"
    if release.hex in installed:
        return "select", f"select release {version} ({short}), installed already"
    assert release.wheel is not None
    wheels = 1 + len(release.requires)
    line = f"install release {version} ({short}) from {len(release.wheel.urls)} mirror(s)"
    if release.requires:
        line += f", with {len(release.requires)} further wheel(s)"
    if downloaded:
        line += f"; {downloaded} of {wheels} wheel(s) downloaded already"
    return "install", line


def agent_plan(
    record: AgentRecord,
    release: AgentRelease | None,
    *,
    installed: set[str],
    downloaded: int,
    self_update: bool,
    min_version: str,
    hook: HookState,
    runtime_warning: str | None = None,
) -> AgentPlan:
    """Pure: the plan from the record, HEAD's release and what the node has locally."""
    record, lines = _after_start(record, installed)
    running = record.entry(record.selected)
    running_version = running.version if running else record.base_version or __version__
    action, said = "none", None
    if release is not None and release.version != running_version:
        action, said = _approved(
            record,
            release,
            installed=installed,
            downloaded=downloaded,
            self_update=self_update,
            min_version=min_version,
            hook=hook,
            running_version=running_version,
        )
    return AgentPlan(
        action=action,
        version=release.version if release else None,
        digest=release.digest if release else None,
        lines=(*lines, *([said] if said else [])),
        runtime_warning=runtime_warning,
    )


def _approved(
    record: AgentRecord,
    release: AgentRelease,
    *,
    installed: set[str],
    downloaded: int,
    self_update: bool,
    min_version: str,
    hook: HookState,
    running_version: str,
) -> tuple[str, str | None]:
    """HEAD approves another agent than the one that runs: the hook, the off switch, then
    the installer's rule (in the order ``apply.steps.agent_release`` follows)."""
    version = release.version
    if hook == "due":
        return "hook", f"the agent-update hook will run for {version}"
    if hook == "ran":
        return "hook-ran", f"the agent-update hook ran for {version} already; it is not run again"
    if not self_update:
        return "off", f"self_update is off: release {version} is not installed"
    step = release_step(record, release, running_version=running_version, min_version=min_version)
    if step == "failed":
        return "failed", f"release {version} failed before and is not retried"
    if step == "below-pin":
        return "refused", f"release {version} refused: below agent_min_version {min_version}"
    if step == "base":
        return "select-base", f"select the base install {version} again; it runs at the next start"
    if step == "no-urls":
        return "no-urls", f"release {version} has no urls: only an agent-update hook can install it"
    if step in ("running", "selected"):
        return "none", None  # the start gate runs it already (its lines said how)
    return _release_line(record, release, installed=installed, downloaded=downloaded)


def _downloaded(folder: AgentFolder, release: AgentRelease) -> int:
    """Wheels already under ``downloads/`` at their size (the pass hashes them again)."""
    if release.wheel is None:
        return 0
    wheels = (release.wheel, *release.requires)
    here = folder.download_dir(release.hex)
    return sum(
        1 for w in wheels if (here / w.name).is_file() and (here / w.name).stat().st_size == w.size
    )


def read_agent_plan(
    state_dir: Path,
    *,
    updates: dict[str, Any],
    images: dict[str, str],
    self_update: bool,
    min_version: str,
    hook: HookState,
) -> AgentPlan:
    """The plan for this node: its agent folder, HEAD's ``updates`` and its runtimes' images."""
    folder = AgentFolder.of(state_dir)
    release = AgentRelease.from_updates(updates)
    record = folder.read()
    if not os.environ.get(RELEASE_ENV):
        # The next start records the base install as this one (it may have been upgraded).
        python, site = record.base_python or "", record.base_site
        record = base_seen(record, version=__version__, python=python, site=site)
    return agent_plan(
        record,
        release,
        installed=folder.installed(),
        downloaded=_downloaded(folder, release) if release else 0,
        self_update=self_update,
        min_version=min_version,
        hook=hook,
        runtime_warning=runtime_update_check(updates, images)["warning"],
    )
