"""The real ``reconcile`` command as a separate process, which a test can kill or starve.

``NodeUnderTest`` runs the CLI in-process (fast, and enough for most scenarios); the
reliability tests need a process of its own: SIGKILL at a random moment, ``faketime`` around
it, ``/proc`` figures of a long-running ``watch``. ``AgentCommand`` builds that process from
a node's environment with nothing else of the developer's shell leaking in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AgentCommand", "Finished", "agent_env", "hookless_agent", "process_figures"]

_ENTRY = "from reconciler.cli import main; main()"


@dataclass(frozen=True)
class Finished:
    exit_code: int  # negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float

    @property
    def reconcile_lines(self) -> list[str]:
        """The CLI's own error lines (log lines on stderr are not among them)."""
        return [line for line in self.stderr.splitlines() if line.startswith("reconcile: ")]

    def describe(self) -> str:
        return f"exit {self.exit_code} after {self.seconds:.1f} s\n{self.stdout}\n{self.stderr}"


class AgentCommand:
    """``reconcile ARGS`` for one node: its settings file, state folder and extra settings."""

    def __init__(self, *, env: Mapping[str, str], cwd: Path, wrapper: Sequence[str] = ()) -> None:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RECONCILER_", "RECONCILE_")) and k != "CONTAINER_HOST"
        }
        self.env = {**base, **env}
        self.cwd = cwd
        self.wrapper = tuple(wrapper)

    def argv(self, *args: str) -> list[str]:
        return [*self.wrapper, sys.executable, "-c", _ENTRY, *args]

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: a kill reaches hooks it started too
        )

    def run(
        self, *args: str, timeout_s: float = 180, env: Mapping[str, str] | None = None
    ) -> Finished:
        started = time.monotonic()
        process = self.start(*args, env=env)
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(process)
            out, err = process.communicate()
            raise AssertionError(
                f"reconcile {' '.join(args)} still running after {timeout_s} s:\n{out}\n{err}"
            ) from None
        return Finished(process.returncode, out, err, time.monotonic() - started)

    def with_wrapper(self, *wrapper: str) -> AgentCommand:
        clone = AgentCommand(env={}, cwd=self.cwd, wrapper=wrapper)
        clone.env = dict(self.env)
        return clone


def agent_env(node_env: Mapping[str, str], *, podman_url: str, hooks: Path) -> dict[str, str]:
    """A node's settings, on the Podman service at ``podman_url``, no disk reserve, ``hooks``."""
    return {
        **node_env,
        "RECONCILER_PODMAN_URL": podman_url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(hooks),
    }


def hookless_agent(node_env: Mapping[str, str], *, podman_url: str, scratch: Path) -> AgentCommand:
    """``reconcile`` for a node with no hooks, run in an empty ``scratch``/cwd (made here)."""
    cwd = scratch / "cwd"
    cwd.mkdir(exist_ok=True)
    env = agent_env(node_env, podman_url=podman_url, hooks=scratch / "no-hooks")
    return AgentCommand(env=env, cwd=cwd)


def kill_group(process: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def process_figures(pid: int) -> dict[str, int]:
    """Open file descriptors and resident memory (KiB) of a live process, from /proc."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"fds": fds, "rss_kib": rss}
