"""What every benchmark shares: results against targets, the machine, timed commands, RSS.

A benchmark module exposes ``NAME`` and ``run(ctx) -> list[Result]``. Each ``Result`` is one
figure: the value the target is about (a ratio, a time, a count), the target, and the baseline
it was compared with, measured in the same run. Times are medians of several runs; when two
commands are compared their runs are interleaved (A B, B A, A B, …) so that a burst of load on
this shared machine hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MIB",
    "PYTHON",
    "RECONCILE",
    "ROOT",
    "Baseline",
    "Context",
    "Result",
    "Target",
    "format_value",
    "interleaved",
    "load_average",
    "machine_summary",
    "median",
    "rss_mib",
    "timed",
]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MIB = 1024 * 1024


def _reconcile_script() -> str:
    # The console script next to this interpreter, not a shell shim found on PATH: a pyenv
    # shim alone costs tens of milliseconds and would be charged to the reconciler.
    beside = Path(sys.executable).parent / "reconcile"
    if beside.is_file():
        return str(beside)
    found = shutil.which("reconcile")
    if found is None:
        raise RuntimeError("the `reconcile` command is not installed (pip install -e .)")
    return found


RECONCILE = _reconcile_script()


@dataclass(frozen=True)
class Target:
    """``value <op> limit`` must hold for the figure to pass."""

    limit: float
    op: Literal["<=", "<", "==", ">="] = "<="

    def met(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.limit
        if self.op == ">=":
            return value >= self.limit
        if self.op == "<":
            return value < self.limit
        return value == self.limit

    def text(self, unit: str) -> str:
        symbol = {"<=": "≤", "<": "<", "==": "=", ">=": "≥"}[self.op]
        return f"{symbol} {_number(self.limit)}{_spaced(unit)}"


@dataclass(frozen=True)
class Baseline:
    """What the figure was compared with: a description and its measured value."""

    label: str
    value: float
    unit: str


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    unit: str
    target: Target | None  # None: a figure reported for context, with no target of its own
    baseline: Baseline | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def line(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "INFO"}[self.passed]
        text = f"{verdict}  {self.name:<28} {_number(self.value)}{_spaced(self.unit)}"
        if self.target is not None:
            text += f"  (target {self.target.text(self.unit)})"
        if self.baseline is not None:
            b = self.baseline
            text += f"  baseline {_number(b.value)}{_spaced(b.unit)}: {b.label}"
        return text

    def to_json(self, machine: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 4),
            "unit": self.unit,
            "target": None if self.target is None else self.target.text(self.unit),
            "baseline": None
            if self.baseline is None
            else {
                "label": self.baseline.label,
                "value": round(self.baseline.value, 4),
                "unit": self.baseline.unit,
            },
            "pass": self.passed,
            "machine": dict(machine),
            "details": self.details,
        }


def format_value(value: float, unit: str) -> str:
    """``1.02x``, ``97.5 ms``, ``10%``: a figure as the tables show it."""
    return f"{_number(value)}{_spaced(unit)}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _spaced(unit: str) -> str:
    return unit if unit in ("x", "%") else f" {unit}"


@dataclass
class Context:
    """One run of ``bench/run.py``: sizes (quick or full), a scratch folder, shared services."""

    quick: bool
    workspace: Path
    machine: dict[str, Any]
    _cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _shared: dict[str, Any] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        path = self.workspace / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def shared(self, key: str, make: Callable[[contextlib.ExitStack], Any]) -> Any:
        """A service several benchmarks use (the Podman lab), started once, closed at the end."""
        if key not in self._shared:
            self._shared[key] = make(self._cleanup)
        return self._shared[key]

    def close(self) -> None:
        self._cleanup.close()
        self._shared.clear()


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def timed(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
) -> float:
    """Wall seconds of one run of ``argv`` (stdout and stderr discarded)."""
    started = time.perf_counter()
    done = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode not in ok_codes:
        tail = done.stderr.decode(errors="replace")[-600:]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {tail}")
    return elapsed


def interleaved(
    commands: Mapping[str, Callable[[], float]], *, runs: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each measurement ``runs`` times, rotating the order every round; the first
    ``warmup`` rounds (page cache, pyc files) are thrown away."""
    labels = list(commands)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for round_no in range(warmup + runs):
        shift = round_no % len(labels)
        for label in labels[shift:] + labels[:shift]:
            seconds = commands[label]()
            if round_no >= warmup:
                samples[label].append(seconds)
    return samples


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mib(pid: int | None = None) -> float:
    """Resident set size of a process (default: this one), from /proc."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text(encoding="ascii")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def machine_summary(*, quick: bool) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_1m_at_start": load_average(),
        "bytecode_cache": "PYTHONPYCACHEPREFIX" in os.environ,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
    }
