"""``python -m bench.watch_driver CONFIG CYCLES SAMPLE…``: ``reconcile watch`` without pauses.

Runs the product's own ``reconciler.agent.watch`` for CYCLES cycles against the node whose
settings file is CONFIG, logging as ``reconcile watch`` does (to stderr). One thing differs
from the command: the pause between cycles. ``core.schedule.jittered`` is replaced by a function
that returns 0, so the next poll is due at once (every cycle fetches: the "fast TTLs") and the loop
does not wait (1,000 cycles at ttl.poll_s = 1 would take 17 minutes). Drift repair runs every
cycle as it does in production; the full re-hash runs every ttl.cache_s seconds.

After the cycles named by SAMPLE (e.g. 10 100 1000) the process's RSS is read from
/proc/self/status; the samples are printed as one JSON object at the end.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from reconciler.agent import loop as agent
from reconciler.cli import _setup_logging
from reconciler.config.settings import load_settings
from reconciler.core import schedule


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str]) -> int:
    config, cycles, *sample_at = argv
    wanted = {int(n) for n in sample_at}
    samples: dict[int, float] = {}
    results: dict[str, int] = {}
    real_cycle = agent._cycle
    count = 0

    def no_pause(seconds: float, rng: random.Random, spread: float = 0.1) -> float:
        return 0.0

    def cycle(*args: Any, **kwargs: Any) -> agent.OnceResult:
        nonlocal count
        outcome = real_cycle(*args, **kwargs)
        count += 1
        key = outcome.converge.result if outcome.converge else f"error {outcome.exit_code}"
        results[key] = results.get(key, 0) + 1
        if outcome.fetch_error is not None:
            results["fetch failed"] = results.get("fetch failed", 0) + 1
        if count in wanted:
            samples[count] = _rss_mib()
        return outcome

    schedule.jittered = no_pause
    agent._cycle = cycle
    _setup_logging("human")
    code = agent.watch(lambda: load_settings(config=config), max_cycles=int(cycles))
    print(json.dumps({"exit": code, "cycles": count, "rss_mib": samples, "results": results}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
