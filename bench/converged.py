"""A converged node with 10 runtime containers and 50 model files (≥ 2 GiB), shared by the
no-op pass and watch memory benchmarks.

Built once per run: the Podman lab, a loopback origin (``FileServer``, kept open: the watch
benchmark polls it), a snapshot whose 10 runtimes each run the sleeper image and mount one
model of 5 files, and a first ``reconcile once`` that downloads the models and starts the
containers. Model files are written from repeated random blocks (fast, yet each file has its
own digest); the origin's copies are deleted once the node has them, halving the disk used.
``--quick`` uses 50 files of 4 MiB.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from dataclasses import dataclass

from bench.harness import MIB, Context
from bench.network import BenchNode, SignedOrigin, model_entry, serve_model_files, snapshot_body
from bench.podman_lab import PodmanLab, start_lab

__all__ = ["ConvergedNode", "converged_node", "podman_lab"]

RUNTIMES = 10
FILES_PER_MODEL = 5
GIB = 1024 * MIB


@dataclass(frozen=True)
class ConvergedNode:
    node: BenchNode
    origin: SignedOrigin
    lab: PodmanLab
    model_bytes: int
    model_files: int
    setup_s: float


def podman_lab(ctx: Context) -> PodmanLab:
    lab: PodmanLab = ctx.shared("podman", lambda stack: start_lab(ctx.folder("lab"), stack))
    return lab


def _build(ctx: Context, stack: contextlib.ExitStack) -> ConvergedNode:
    started = time.monotonic()
    lab = podman_lab(ctx)
    folder = ctx.folder("converged")
    origin = SignedOrigin(folder / "origin")
    stack.callback(origin.close)
    files = RUNTIMES * FILES_PER_MODEL
    size = 4 * MIB if ctx.quick else math.ceil(2 * GIB / files)
    models, runtimes = [], []
    for i in range(RUNTIMES):
        sizes = {f"shard-{j}.safetensors": size for j in range(FILES_PER_MODEL)}
        served = serve_model_files(origin.root, sizes, seed=f"converged-m{i}")
        models.append(model_entry(f"m{i}", "v1", served))
        runtimes.append({"name": f"r{i}", "image": lab.images["sleeper"], "models": [f"m{i}:v1"]})
    # Fast timers for the watch benchmark: poll every second, full re-hash every minute.
    ttl = {"poll_s": 1, "retry_min_s": 1, "retry_max_s": 2, "cache_s": 60}
    origin.publish(snapshot_body(models=models, runtimes=runtimes, ttl=ttl))
    node = BenchNode(folder / "node").init(
        origin.url, origin.root_envelope, podman_url=lab.service.url, disk_reserve_bytes=0
    )
    done = subprocess.run(
        node.argv("once"), env=node.env(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"first `reconcile once` failed: {done.stdout}{done.stderr}"[-2000:])
    shutil.rmtree(origin.root / "files")
    return ConvergedNode(
        node=node,
        origin=origin,
        lab=lab,
        model_bytes=files * size,
        model_files=files,
        setup_s=time.monotonic() - started,
    )


def converged_node(ctx: Context) -> ConvergedNode:
    converged: ConvergedNode = ctx.shared("converged", lambda stack: _build(ctx, stack))
    return converged
