"""update downtime: how long no runtime container runs during an image update.

A node with one runtime (the sleeper image, no ports) on the private Podman service. Each
round publishes a snapshot that changes the runtime's image (v1 ↔ v2) with ``update`` set to
``stop-first`` or ``start-first``, alternately, and runs ``reconcile once`` (fetch, pull,
replace, health gate). Meanwhile a thread outside the agent lists the runtime's containers
through the Podman REST API as fast as it answers (every ~10-30 ms) and records how many are
running.

Downtime of one update: the longest stretch with no running container, measured from the
last sample that saw one to the first that sees one again (an upper bound: up to two polling
intervals too long). "Healthy" is "running" here: the agent runs health checks itself (Podman
has no health timers without systemd), so from outside a container is either running or not.
The figure per strategy is the worst of its rounds; start-first carries the ≤ 1 s target.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
import time

from bench.converged import podman_lab
from bench.harness import Context, Result, Target, load_average, median
from bench.network import BenchNode, SignedOrigin, snapshot_body
from bench.podman_lab import ApiProbe

NAME = "downtime"
RUNTIME = "svc"
STRATEGIES = ("stop-first", "start-first")


class _Watcher(threading.Thread):
    """Samples (monotonic time, running containers of RUNTIME) until stopped."""

    def __init__(self, service_url: str) -> None:
        super().__init__(name="downtime-watcher", daemon=True)
        self._probe = ApiProbe(service_url)
        self._finished = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.errors = 0

    def run(self) -> None:
        while not self._finished.is_set():
            try:
                states = self._probe.states(RUNTIME)
            except (OSError, RuntimeError):
                self.errors += 1
                continue
            self.samples.append((time.monotonic(), sum(s == "running" for s in states)))
            time.sleep(0.005)

    def finish(self) -> list[tuple[float, int]]:
        self._finished.set()
        self.join(10)
        self._probe.close()
        return self.samples


def _longest_gap(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """(upper bound, lower bound) of the longest stretch without a running container."""
    upper = lower = 0.0
    last_up: float | None = None
    first_down: float | None = None
    last_down: float | None = None
    for when, running in samples:
        if running:
            if first_down is not None and last_up is not None and last_down is not None:
                upper = max(upper, when - last_up)
                lower = max(lower, last_down - first_down)
            last_up, first_down, last_down = when, None, None
        else:
            first_down = when if first_down is None else first_down
            last_down = when
    if first_down is not None:
        raise RuntimeError("downtime: no container was running at the end of the update")
    return upper, lower


def run(ctx: Context) -> list[Result]:
    lab = podman_lab(ctx)
    # Another benchmark's node may have left containers; this node's first plan would remove
    # them (they are managed and not desired here), which is not what is being measured.
    lab.remove_all_containers()
    folder = ctx.folder("downtime")
    origin = SignedOrigin(folder / "origin")
    images = [lab.images["sleeper"], lab.images["sleeper2"]]
    rounds = 1 if ctx.quick else 3
    gaps: dict[str, list[tuple[float, float]]] = {s: [] for s in STRATEGIES}
    walls: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    intervals: list[float] = []
    try:
        node = BenchNode(folder / "node").init(
            origin.url, origin.root_envelope, podman_url=lab.service.url, disk_reserve_bytes=0
        )
        env = node.env()

        def publish(image: str, strategy: str) -> None:
            runtime = {"name": RUNTIME, "image": image, "update": strategy}
            origin.publish(snapshot_body(runtimes=[runtime]))

        def once() -> float:
            started = time.monotonic()
            done = subprocess.run(
                node.argv("once"), env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"reconcile once: {done.stdout}{done.stderr}"[-1500:])
            return time.monotonic() - started

        publish(images[0], "stop-first")
        once()
        update = 0
        for _ in range(rounds):
            for strategy in STRATEGIES:
                update += 1
                publish(images[update % 2], strategy)
                watcher = _Watcher(lab.service.url)
                watcher.start()
                time.sleep(0.2)  # a few samples before the update starts
                walls[strategy].append(once())
                time.sleep(0.2)
                samples = watcher.finish()
                gaps[strategy].append(_longest_gap(samples))
                intervals += [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    finally:
        origin.close()
        lab.remove_all_containers()
        shutil.rmtree(folder, ignore_errors=True)
    results = []
    for strategy in STRATEGIES:
        worst = max(upper for upper, _ in gaps[strategy])
        results.append(
            Result(
                name=f"downtime.{strategy}",
                value=worst,
                unit="s",
                target=Target(1.0) if strategy == "start-first" else None,
                details={
                    "gaps_s_upper_lower": [[round(u, 3), round(lo, 3)] for u, lo in gaps[strategy]],
                    "update_wall_s": [round(w, 2) for w in walls[strategy]],
                    "poll_interval_ms_median": round(median(intervals) * 1000, 1),
                    "rounds": rounds,
                    "load_1m": load_average(),
                },
            )
        )
    return results
