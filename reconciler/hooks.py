"""Operator hooks (contract §7): ``pre-apply`` may veto, ``post-apply`` may extend.

Edge module (subprocesses). A hook runs in its own process group with a timeout that kills
the whole group (a hook that forks a daemon cannot outlive its timeout); its combined output
is captured up to ``OUTPUT_CAP`` bytes for the receipt. The environment is the agent's own
plus the ``RECONCILE_*`` variables, whose values the agent computes itself (digests, serial,
reason, paths): nothing from the snapshot's free-form fields reaches a hook's environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OUTPUT_CAP", "HookResult", "run_hook"]

OUTPUT_CAP = 64 * 1024  # bytes of hook output kept for the receipt


@dataclass(frozen=True)
class HookResult:
    name: str
    ran: bool
    exit_code: int | None  # None when it did not run or was killed at the timeout
    output: str
    timed_out: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.ran or self.exit_code == 0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ran": self.ran,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 3),
            "output": self.output,
        }


def _drain(stream: object, sink: bytearray) -> None:
    # Keep reading past the cap so a chatty hook never blocks on a full pipe.
    assert hasattr(stream, "read")
    while chunk := stream.read(65536):
        room = OUTPUT_CAP - len(sink)
        if room > 0:
            sink.extend(chunk[:room])


def run_hook(hooks_dir: Path, name: str, *, env: Mapping[str, str], timeout_s: float) -> HookResult:
    """Run ``hooks_dir/name`` if it exists and is executable; never raises for its failure."""
    path = hooks_dir / name
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
    output = bytearray()
    reader = threading.Thread(target=_drain, args=(process.stdout, output), daemon=True)
    reader.start()
    timed_out = False
    try:
        code: int | None = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Children of the hook may still hold the pipe open; after a kill, the group is gone.
    reader.join(timeout=2.0)
    if process.stdout is not None:
        process.stdout.close()
    text = output.decode("utf-8", errors="replace")
    if timed_out:
        text += f"\n[killed after {timeout_s:g} s]"
    return HookResult(
        name=name,
        ran=True,
        exit_code=code,
        output=text,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )
