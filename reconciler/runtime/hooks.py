"""Operator hooks (docs/contract.md §7): ``pre-apply`` may veto, ``post-apply`` may extend.

Edge module (subprocesses). A hook runs in its own process group with a timeout that kills
the whole group, and whatever the hook leaves in its group is killed when it is done (a hook
that forks a daemon cannot outlive it, nor hold the agent past its timeout by keeping the
output pipe open); its combined output is captured up to ``OUTPUT_CAP`` bytes for the
receipt. The environment is the agent's own plus the ``RECONCILE_*`` variables, whose values
the agent computes itself (digests, serial, reason, paths): nothing from the snapshot's
free-form fields reaches a hook's environment.

Strict modes (``disk.strict``): a hook that exists is checked, with its folder and every
folder above, before it runs; one that someone other than root or the agent's user could
have written is not run, and its ``HookResult`` carries the one-line reason (``refused``),
which ``pre-apply`` turns into a veto and the apply keeps in the node record for ``status``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.errors import SettingsError
from reconciler.disk.strict import check_trusted

__all__ = ["OUTPUT_CAP", "HookResult", "run_hook"]

OUTPUT_CAP = 64 * 1024  # bytes of hook output kept for the receipt

_log = logging.getLogger("reconciler.hooks")


@dataclass(frozen=True)
class HookResult:
    name: str
    ran: bool
    exit_code: int | None  # None when it did not run or was killed at the timeout
    output: str
    timed_out: bool = False
    duration_s: float = 0.0
    refused: str | None = None  # why strict modes kept it from running (``disk.strict``)

    @property
    def ok(self) -> bool:
        return self.refused is None and (not self.ran or self.exit_code == 0)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ran": self.ran,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 3),
            "output": self.output,
            **({"refused": self.refused} if self.refused is not None else {}),
        }


def _exited(pid: int) -> bool:
    """Whether the hook's own process has ended, without reaping it: an unreaped zombie keeps
    its pid, and so its process-group id, from being reused before the group is killed."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the hook's group (its unreaped leader keeps the id)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _collect(process: subprocess.Popen[bytes], *, deadline: float) -> tuple[bytes, bool]:
    """The hook's output (up to ``OUTPUT_CAP``) once it is done, and whether ``deadline``
    came first. Done: its own process has exited and its output is closed."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    output = bytearray()
    closed = False
    while not (closed and _exited(process.pid)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(output), True
        if closed:
            time.sleep(min(0.05, remaining))
            continue
        ready, _, _ = select.select([fd], [], [], min(0.1, remaining))
        if ready:
            # Keep reading past the cap so a chatty hook never blocks on a full pipe.
            chunk = os.read(fd, 65536)
            closed = not chunk
            output.extend(chunk[: max(0, OUTPUT_CAP - len(output))])
    return bytes(output), False


def _refusal(hooks_dir: Path, path: Path, *, group: str | None) -> str | None:
    """Why strict modes forbid running ``path``, or None (the folder is named first, so the
    line says ``hooks folder … is writable by group`` rather than blaming the hook)."""
    try:
        check_trusted(hooks_dir, what="hooks folder", group=group)
        check_trusted(path, what="hook", group=group)
    except SettingsError as exc:
        _log.error("%s not run: %s", path.name, exc.one_line())
        return exc.one_line()
    return None


def run_hook(
    hooks_dir: Path,
    name: str,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    group: str | None = None,
) -> HookResult:
    """Run ``hooks_dir/name`` if it exists, is executable and passes strict modes (``group``:
    the ``strict_modes_group``); never raises for its failure.

    The hook is its process group. It is done when its own process has exited and its output
    is closed (background children still writing to it are part of the hook). At
    ``timeout_s`` whatever is left of the group is killed; after the hook is done, any
    process it left in its group is killed too, so nothing a hook starts outlives it (a
    service it means to start belongs to the service manager). The verdict is the exit code
    of the hook's own process (None if it was still running at the timeout).
    """
    path = hooks_dir / name
    if not os.path.lexists(path):
        return HookResult(name=name, ran=False, exit_code=None, output="")
    refused = _refusal(hooks_dir, path, group=group)
    if refused is not None:
        return HookResult(name=name, ran=False, exit_code=None, output="", refused=refused)
    if not path.is_file() or not os.access(path, os.X_OK):
        return HookResult(name=name, ran=False, exit_code=None, output="")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=str(hooks_dir),
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(name=name, ran=True, exit_code=126, output=f"cannot run: {exc.strerror}")
    assert process.stdout is not None
    try:
        output, timed_out = _collect(process, deadline=started + timeout_s)
    finally:
        _kill_group(process.pid)
        code: int | None = process.wait()
        process.stdout.close()
    text = output.decode("utf-8", errors="replace")
    if timed_out:
        if code == -signal.SIGKILL:
            code = None  # killed by us, not an answer
        text += f"\n[killed after {timeout_s:g} s]"
    return HookResult(
        name=name,
        ran=True,
        exit_code=code,
        output=text,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )
