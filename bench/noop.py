"""no-op pass: ``reconcile once --offline`` on a converged node, against the import floor.

The node (``bench/converged.py``) runs 10 containers on the private Podman service and holds
50 model files of ≥ 2 GiB in all. Timed: the whole process, wall clock, interleaved with the
import floor ``python -c "import click, pygit2, podman, httpx, nacl, jsonschema"`` — no pass
can start faster than its libraries load. The pass re-verifies HEAD, asks Podman for the
containers (2 lists and 10 inspects), checks the 50 files by ``lstat`` and finds nothing to do.

Two floors are reported. jsonschema, when imported bare, loads rfc3987_syntax, which compiles
a grammar for over a second; the product blocks it (reconciler/schema.py: no IRI formats are
checked), and a fresh install of this project no longer has it. So the floor with the same
block is the like-for-like comparison; the literal command of the brief is the other figure.

Model files opened: a separate run under ``bench.open_audit`` (an audit hook on every ``open``)
counts the files opened under the node's models folder; ``strace`` cross-checks at the system
call level when it is allowed to run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.converged import converged_node
from bench.harness import (
    PYTHON,
    ROOT,
    Baseline,
    Context,
    Result,
    Target,
    interleaved,
    load_average,
    median,
    timed,
)

NAME = "noop"
FLOOR = "import click, pygit2, podman, httpx, nacl, jsonschema"
FLOOR_NO_IRI = "import sys; sys.modules['rfc3987_syntax'] = None; " + FLOOR


def _audited_opens(argv_tail: list[str], env: dict[str, str], models: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "opened.json"
        argv = [PYTHON, "-m", "bench.open_audit", str(models), str(report), "--", *argv_tail]
        subprocess.run(
            argv,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        outcome = json.loads(report.read_text(encoding="utf-8"))
    if outcome["exit"] != 0:
        raise RuntimeError(f"audited `reconcile once --offline` exited {outcome['exit']}")
    return list(outcome["opened"])


def _straced_opens(argv: list[str], env: dict[str, str], models: Path) -> int | None:
    """Model files opened at the system-call level, or None when strace cannot run here."""
    if shutil.which("strace") is None:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace"
        done = subprocess.run(
            ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace), *argv],
            env=env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0 or not trace.exists():
            return None
        marker = str(models.resolve()) + "/"
        return sum(
            1
            for line in trace.read_text(errors="replace").splitlines()
            # Listing a folder (scandir) opens it with O_DIRECTORY: that reads no file.
            if marker in line and "/.index.json" not in line and "O_DIRECTORY" not in line
        )


def run(ctx: Context) -> list[Result]:
    converged = converged_node(ctx)
    node = converged.node
    env = node.env()
    once = node.argv("once", "--offline")
    check = subprocess.run(once, env=env, capture_output=True, text=True, check=False)
    # A pass with nothing to do says "converged on serial N (digest)" and lists no actions.
    if check.returncode != 0 or "converged on serial" not in check.stdout or "): " in check.stdout:
        raise RuntimeError(f"the node is not converged: {check.stdout}{check.stderr}"[-1500:])
    models = node.state_dir / "models"
    opened = _audited_opens(["once", "--offline"], env, models)
    straced = _straced_opens(once, env, models)

    samples = interleaved(
        {
            "once --offline": lambda: timed(once, env=env),
            "floor": lambda: timed([PYTHON, "-c", FLOOR], env=env),
            "floor, no IRI grammar": lambda: timed([PYTHON, "-c", FLOOR_NO_IRI], env=env),
        },
        runs=3 if ctx.quick else 7,
    )
    ms = {label: median(values) * 1000 for label, values in samples.items()}
    details = {
        "node": {
            "containers": 10,
            "model_files": converged.model_files,
            "model_bytes": converged.model_bytes,
        },
        "median_ms": {k: round(v, 1) for k, v in ms.items()},
        "runs": len(samples["floor"]),
        "setup_s": round(converged.setup_s, 1),
        "load_1m": load_average(),
    }
    return [
        Result(
            name="noop.vs_floor",
            value=ms["once --offline"] / ms["floor"],
            unit="x",
            target=Target(1.5),
            baseline=Baseline(f'python -c "{FLOOR}"', ms["floor"], "ms"),
            details=details,
        ),
        Result(
            name="noop.vs_floor_no_iri",
            value=ms["once --offline"] / ms["floor, no IRI grammar"],
            unit="x",
            target=Target(1.5),
            baseline=Baseline(
                "the same imports with rfc3987_syntax blocked, as the product does",
                ms["floor, no IRI grammar"],
                "ms",
            ),
            details=details,
        ),
        Result(
            name="noop.model_files_opened",
            value=len(opened),
            unit="files",
            target=Target(0, "=="),
            details={"opened": opened[:20], "strace_count": straced},
        ),
    ]
