"""The start gate: what ``reconcile watch`` runs, and when a release has proved itself.

Where it sits: the CLI's ``watch`` calls ``start_gate`` before anything else. In the base
install (no ``RECONCILER_AGENT_RELEASE`` in the environment) it reads ``agent/state.json``:
a selected release that is good is exec'd; one on trial gets its start counted durably
first, then is exec'd with an alarm of ``agent_settle_s`` seconds pending (an alarm survives
exec, and SIGALRM's default action ends the process, so a release that hangs before its
first converged cycle is ended by the kernel, whatever its own code does). A release whose
``MAX_STARTS`` starts all ended before a converged cycle is abandoned here: recorded as
failed, the previous release or the base install runs instead.

In the release, ``note_converged`` (called by the watch loop after each converged cycle)
marks it good and cancels the alarm; ``switch_due`` tells the loop when another release has
been selected, so that it exits and the supervisor starts that one.

It may not download or install (``install`` does), nor change anything but the agent record.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import site
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from reconciler import __version__
from reconciler.core.agentrelease import (
    MAX_STARTS,
    AgentRecord,
    StartDecision,
    abandoned,
    base_seen,
    marked_good,
    next_start,
    started,
)
from reconciler.core.documents import format_time
from reconciler.core.errors import ReconcilerError
from reconciler.disk.atomic import write_atomic
from reconciler.selfupdate.folder import RELEASE_ENV, AgentFolder, die_at

__all__ = ["note_converged", "record_running", "running_release", "start_gate", "switch_due"]

log = logging.getLogger("reconciler")

# What the release runs: its own interpreter and its own CLI, with the base's arguments.
_ENTRY = "from reconciler.cli import main; main()"


def running_release() -> str | None:
    """The digest hex of the release this process is, or None for the base install."""
    return os.environ.get(RELEASE_ENV) or None


def start_gate(state_dir: Path, *, settle_s: int, argv: Sequence[str]) -> None:
    """Exec the selected release (never returns then); return to run the base install."""
    if running_release() is not None:
        return
    folder = AgentFolder.of(state_dir)
    if not folder.record_file.exists():
        return  # no release was ever installed: nothing to read, nothing to write
    for _ in range(2 * MAX_STARTS + 2):  # each round abandons one release or returns
        decision = _decide(folder)
        if decision.abandon is not None:
            continue  # the previous release or the base is selected now: decide again
        if decision.run is None:
            return
        _exec(folder, decision.run, trial=decision.trial, settle_s=settle_s, argv=argv)


def _decide(folder: AgentFolder) -> StartDecision:
    """One decision under the lock: abandon, or count the start, in the same write."""
    at = format_time(time.time())
    installed = folder.installed()
    made: list[StartDecision] = []

    def transition(record: AgentRecord) -> AgentRecord:
        record = base_seen(
            record, version=__version__, python=sys.executable, site=tuple(site.getsitepackages())
        )
        decision = next_start(record, installed=installed)
        made.append(decision)
        if decision.abandon is not None:
            return abandoned(record, at=at, why=decision.abandon)
        return started(record, at=at) if decision.trial else record

    before = folder.read()
    after = folder.change(transition)
    decision = made[-1]
    if decision.abandon is not None:
        gone = before.entry(before.selected)
        log.error(
            "agent: release %s (%s) abandoned: %s; running %s",
            gone.version if gone else "?",
            (before.selected or "?")[:12],
            decision.abandon,
            _describe(after, after.selected),
        )
    return decision


def _describe(record: AgentRecord, hex_digest: str | None) -> str:
    entry = record.entry(hex_digest)
    if hex_digest is None or entry is None:
        return f"the base install {record.base_version or '?'}"
    return f"release {entry.version} ({hex_digest[:12]})"


def _exec(
    folder: AgentFolder, hex_digest: str, *, trial: bool, settle_s: int, argv: Sequence[str]
) -> None:
    """Replace this process with the release; if that fails, abandon it and return."""
    python = folder.python(hex_digest)
    record = folder.read()
    entry = record.entry(hex_digest)
    on_trial = f" on trial (start {entry.starts} of {MAX_STARTS})" if trial and entry else ""
    log.info("agent: starting %s%s", _describe(record, hex_digest), on_trial)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env[RELEASE_ENV] = hex_digest
    if trial:
        die_at("agent-counted")
        signal.alarm(settle_s)
    try:
        # -P: nothing from the working folder shadows the release's own code.
        os.execve(python, [str(python), "-P", "-c", _ENTRY, *argv], env)
    except OSError as exc:
        signal.alarm(0)
        why = f"cannot start {python}: {exc.strerror or exc}"
        at = format_time(time.time())
        folder.change(lambda r: abandoned(r, at=at, why=why) if r.selected == hex_digest else r)
        log.error("agent: release %s abandoned: %s", hex_digest[:12], why)


def record_running(state_dir: Path) -> None:
    """``agent/running.json``: which agent this watch process is, for ``status``."""
    folder = AgentFolder.of(state_dir)
    info = {
        "version": __version__,
        "release": running_release(),
        "pid": os.getpid(),
        "started_at": format_time(time.time()),
    }
    try:
        write_atomic(folder.root / "running.json", (json.dumps(info) + "\n").encode())
    except ReconcilerError as exc:
        log.warning("agent: cannot record the running agent: %s", exc.one_line())


def note_converged(state_dir: Path) -> bool:
    """In a release on trial: its first converged cycle makes it good. True if it did now."""
    hex_digest = running_release()
    if hex_digest is None:
        return False
    folder = AgentFolder.of(state_dir)
    entry = folder.read().entry(hex_digest)
    if entry is None or entry.state != "trial":
        return False
    signal.alarm(0)
    at = format_time(time.time())
    folder.change(lambda r: marked_good(r, hex_digest=hex_digest, at=at))
    log.info("agent: release %s (%s) is good: it converged", entry.version, hex_digest[:12])
    return True


def switch_due(state_dir: Path) -> str | None:
    """Why this process should exit so that the supervisor starts another agent, or None."""
    folder = AgentFolder.of(state_dir)
    if not folder.record_file.exists():
        return None
    record = folder.read()
    if record.selected == running_release():
        return None
    return f"agent: {_describe(record, record.selected)} is selected"
