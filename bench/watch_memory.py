"""watch memory: RSS of ``reconcile watch`` after 1,000 cycles against after 10.

The converged node of ``bench/converged.py`` (10 containers, 50 model files of ≥ 2 GiB) is
watched by ``bench.watch_driver`` — the product's ``agent.watch`` with the pause between
cycles removed — polling the loopback origin every cycle (head.json answers 304), asking
Podman for the containers and checking every model file by ``lstat`` every cycle, and
re-hashing all model files every ttl.cache_s = 60 s. RSS comes from /proc after cycles 10, 100,
…, 1,000 (100 with --quick). Targets: the last sample at most 1.1x the sample after 10
cycles, and under 80 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from bench.converged import converged_node
from bench.harness import PYTHON, ROOT, Baseline, Context, Result, Target, load_average

NAME = "watch_memory"


def run(ctx: Context) -> list[Result]:
    converged = converged_node(ctx)
    node = converged.node
    cycles = 100 if ctx.quick else 1000
    sample_at = [n for n in (10, 50, 100, 250, 500, 750, 1000) if n <= cycles]
    log = ctx.folder("watch_memory") / "watch.log"
    argv = [
        PYTHON,
        "-m",
        "bench.watch_driver",
        str(node.config),
        str(cycles),
        *map(str, sample_at),
    ]
    started = time.monotonic()
    with log.open("wb") as stderr:
        done = subprocess.run(
            argv,
            env={**node.env(), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=stderr,
            check=False,
        )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"watch driver exited {done.returncode}: {tail}")
    report = json.loads(done.stdout)
    rss = {int(k): v for k, v in report["rss_mib"].items()}
    first, last = rss[10], rss[cycles]
    details = {
        "rss_mib": {str(k): round(v, 1) for k, v in sorted(rss.items())},
        "cycles": report["cycles"],
        "cycle_results": report["results"],
        "seconds": round(elapsed, 1),
        "cycles_per_s": round(report["cycles"] / elapsed, 1),
        "log_lines": sum(1 for _ in log.open("rb")),
        "load_1m": load_average(),
    }
    os.unlink(log)
    return [
        Result(
            name="watch_memory.growth",
            value=last / first,
            unit="x",
            target=Target(1.1),
            baseline=Baseline("RSS after 10 cycles", first, "MiB"),
            details=details,
        ),
        Result(
            name="watch_memory.rss",
            value=last,
            unit="MiB",
            target=Target(80, "<"),
            details={"after_cycles": cycles},
        ),
    ]
