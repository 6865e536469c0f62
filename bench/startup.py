"""startup: ``reconcile --version`` and ``reconcile status`` against bare interpreter imports.

Whole processes, wall time, interleaved, medians. ``--version`` is compared with
``python -c "import click"`` (the CLI cannot start faster than its argument parser loads);
``status`` with ``python -c "import click, pygit2"`` (it reads the state repository). The node
has a HEAD fetched from a loopback origin, so ``status`` has a commit, a record and roots to
read; the origin is closed before timing (``status`` must not contact it anyway).
"""

from __future__ import annotations

from bench.harness import (
    PYTHON,
    Baseline,
    Context,
    Result,
    Target,
    interleaved,
    load_average,
    median,
    timed,
)
from bench.network import BenchNode, SignedOrigin, snapshot_body
from reconciler.intake.fetch import fetch

NAME = "startup"


def run(ctx: Context) -> list[Result]:
    folder = ctx.folder("startup")
    origin = SignedOrigin(folder / "origin")
    try:
        node = BenchNode(folder / "node").init(origin.url, origin.root_envelope)
        origin.publish(snapshot_body())
        fetch(node.node())
    finally:
        origin.close()
    env = node.env()
    commands = {
        "version": lambda: timed(node.argv("--version"), env=env),
        "click": lambda: timed([PYTHON, "-c", "import click"], env=env),
        "status": lambda: timed(node.argv("status"), env=env),
        "click+pygit2": lambda: timed([PYTHON, "-c", "import click, pygit2"], env=env),
    }
    samples = interleaved(commands, runs=7 if ctx.quick else 21, warmup=2)
    ms = {label: median(values) * 1000 for label, values in samples.items()}
    details = {
        "median_ms": {k: round(v, 1) for k, v in ms.items()},
        "runs": len(samples["version"]),
        "load_1m": load_average(),
    }
    return [
        Result(
            name="startup.version",
            value=ms["version"] / ms["click"],
            unit="x",
            target=Target(1.5),
            baseline=Baseline('python -c "import click"', ms["click"], "ms"),
            details={**details, "measured_ms": round(ms["version"], 1)},
        ),
        Result(
            name="startup.status",
            value=ms["status"] / ms["click+pygit2"],
            unit="x",
            target=Target(1.5),
            baseline=Baseline('python -c "import click, pygit2"', ms["click+pygit2"], "ms"),
            details={**details, "measured_ms": round(ms["status"], 1)},
        ),
    ]
