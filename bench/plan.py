"""plan: what ``reconcile plan`` computes, for 1,000 runtimes / 10,000 model files and 10x that.

Two things are timed, each at 1x and 10x, and both get the targets (≤ 50 ms at 1x, growth
≤ 12x):

* ``plan.pure_*`` — ``core.containerplan.plan_containers(desired, observed)``, the pure
  container plan;
* ``plan.with_models_*`` — ``apply.nodeplan.plan_node``: the runtime files compared with
  ``runtime/``, the same ``plan_containers()``, and the model side (``is_installed`` of every
  model: a walk and an ``lstat`` per file, with the store's index loaded fresh, then the
  installed trees listed). Podman's answer is the one thing not measured: the edge hands over
  a prepared list of observed containers (that round trip is part of the no-op pass
  benchmark).

The node is converged, so every plan comes out empty, which is what a node computes on almost
every pass. A full garbage collection runs before each timed call, so that one call does not
pay for the garbage of the previous one.

The model store is real: one small blob per file under ``models/blobs/sha256/``, hard-linked
into ``models/<name>/<version>/``, and an index in the store's documented format (writing it
through ``ModelStore.install`` would rewrite the index once per model). Each runtime mounts one
model of 10 files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Baseline, Context, Result, Target, load_average, median
from reconciler.apply.edges import StoreEdge
from reconciler.apply.nodeplan import plan_node
from reconciler.apply.target import ApplyTarget
from reconciler.config.settings import Settings
from reconciler.core.containerplan import ObservedContainer, plan_containers
from reconciler.core.documents import Snapshot, format_time
from reconciler.core.participation import participation, runtime_files
from reconciler.core.paths import NodePaths
from reconciler.core.specs import container_specs
from reconciler.models.store import INDEX_NAME, ModelStore
from tests.support.signing import base_snapshot

NAME = "plan"
FILES_PER_MODEL = 10
_IMAGE = "127.0.0.1:5000/reconciler/sleeper@sha256:" + "ab" * 32
_CONFIG_DIGEST = "sha256:" + "cd" * 32


@dataclass(frozen=True)
class _Scene:
    paths: NodePaths
    target: ApplyTarget
    observed: list[ObservedContainer]


class _PreparedEdge:
    """Stands in for ``PodmanEdge``: ``observe`` answers what was prepared, instantly."""

    def __init__(self, observed: list[ObservedContainer]) -> None:
        self._observed = observed

    def observe(self) -> list[ObservedContainer]:
        return self._observed


def _content(model: str, path: str) -> bytes:
    return f"{model}/{path}\n".encode()


def _snapshot(runtimes: int) -> Snapshot:
    body = base_snapshot()
    body.update(serial=1, issued_at="2024-01-01T00:00:00Z", expires="2099-01-01T00:00:00Z")
    body["participation"]["subclouds"] = []
    models, specs = [], []
    for i in range(runtimes):
        name = f"m{i:05d}"
        files = []
        for j in range(FILES_PER_MODEL):
            path = f"shard-{j}.bin" if j % 2 else f"sub/shard-{j}.bin"
            data = _content(name, path)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            files.append({"path": path, "size": len(data), "digest": digest, "urls": [path]})
        models.append({"name": name, "version": "v1", "files": files})
        specs.append(
            {
                "name": f"rt{i:05d}",
                "image": _IMAGE,
                "command": ["sh", "-c", "sleep infinity"],
                "env": {"RUNTIME_INDEX": str(i), "LOG_LEVEL": "info"},
                "models": [f"{name}:v1"],
            }
        )
    body["models"], body["runtimes"] = models, specs
    return Snapshot.from_payload(body)


def _write_store(paths: NodePaths, snapshot: Snapshot) -> None:
    """Blobs, hard-linked trees and the index, as a store that installed them would hold."""
    blob_dir = paths.models / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    now = format_time(time.time())
    blobs: dict[str, dict[str, Any]] = {}
    installed: dict[str, dict[str, Any]] = {}
    for model in snapshot.models:
        tree = paths.models / model.name / model.version
        for file in model.files:
            hex_ = file.digest.removeprefix("sha256:")
            blob = blob_dir / hex_
            blob.write_bytes(_content(model.name, file.path))
            blob.chmod(0o444)
            target = tree / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob, target)
            st = blob.lstat()
            blobs[hex_] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "inode": st.st_ino,
                "verified_at": now,
            }
        installed[model.id] = {
            "files": {f.path: f.digest for f in model.files},
            "installed_at": now,
        }
    index = {"format": 1, "blobs": blobs, "failures": {}, "models": installed}
    (paths.models / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _scene(folder: Path, runtimes: int) -> _Scene:
    paths = NodePaths(folder / "state")
    snapshot = _snapshot(runtimes)
    specs = container_specs(snapshot, config_digest=_CONFIG_DIGEST, paths=paths)
    view = participation(snapshot, vram_mib=None, opt_out=())
    files = runtime_files(snapshot, config_digest=_CONFIG_DIGEST, view=view)
    paths.runtime.mkdir(parents=True)
    for name, data in files.items():
        (paths.runtime / name).write_bytes(data)
    _write_store(paths, snapshot)
    observed = [
        ObservedContainer(
            id=hashlib.sha256(spec.name.encode()).hexdigest(),
            name=spec.name,
            state="running",
            labels=spec.labels,
            image=spec.image,
            image_id="ef" * 32,
        )
        for spec in specs
    ]
    target = ApplyTarget(
        commit="0" * 40,
        digest=_CONFIG_DIGEST,
        serial=1,
        reason="fetch",
        snapshot=snapshot,
        containers=tuple(specs),
        view=view,
        files=files,
    )
    return _Scene(paths=paths, target=target, observed=observed)


def _time_compute_plan(scene: _Scene, runs: int) -> tuple[list[float], Any]:
    edge = _PreparedEdge(scene.observed)
    samples, result = [], None
    for _ in range(runs + 1):
        gc.collect()
        started = time.perf_counter()
        models = StoreEdge(ModelStore(scene.paths), settings=Settings())
        result = plan_node(
            scene.target,
            runtime_dir=scene.paths.runtime,
            runtime=edge,  # type: ignore[arg-type]
            models=models,
        )
        samples.append(time.perf_counter() - started)
    return samples[1:], result


def _time_pure_plan(scene: _Scene, runs: int) -> list[float]:
    samples = []
    for _ in range(runs + 1):
        gc.collect()
        started = time.perf_counter()
        result = plan_containers(scene.target.containers, scene.observed)
        samples.append(time.perf_counter() - started)
        if not result.empty:
            raise RuntimeError("plan: the prepared node is not converged")
    return samples[1:]


def run(ctx: Context) -> list[Result]:
    base = 100 if ctx.quick else 1_000
    runs = 5 if ctx.quick else 9
    figures: dict[int, dict[str, float]] = {}
    for runtimes in (base, base * 10):
        folder = ctx.folder(f"plan/{runtimes}")
        started = time.monotonic()
        scene = _scene(folder, runtimes)
        setup_s = time.monotonic() - started
        pure = _time_pure_plan(scene, runs)
        samples, node_plan = _time_compute_plan(scene, runs)
        if not node_plan.empty:
            raise RuntimeError(f"plan: not converged: {node_plan.describe()[:3]}")
        figures[runtimes] = {
            "compute_plan_ms": median(samples) * 1000,
            "plan_only_ms": median(pure) * 1000,
            "setup_s": setup_s,
        }
        shutil.rmtree(folder)
    small, large = figures[base], figures[base * 10]
    details = {
        "sizes": {
            "1x": {"runtimes": base, "model_files": base * FILES_PER_MODEL},
            "10x": {"runtimes": base * 10, "model_files": base * 10 * FILES_PER_MODEL},
        },
        "median_ms": {
            "1x": {k: round(v, 2) for k, v in small.items() if k.endswith("_ms")},
            "10x": {k: round(v, 2) for k, v in large.items() if k.endswith("_ms")},
        },
        "runs": runs,
        "load_1m": load_average(),
    }
    results = []
    for prefix, key in (("pure", "plan_only_ms"), ("with_models", "compute_plan_ms")):
        results += [
            Result(
                name=f"plan.{prefix}_1x",
                value=small[key],
                unit="ms",
                target=Target(50),
                details=details,
            ),
            Result(
                name=f"plan.{prefix}_growth",
                value=large[key] / small[key],
                unit="x",
                target=Target(12),
                baseline=Baseline("the same at 1x", small[key], "ms"),
                details={"10x_ms": round(large[key], 2)},
            ),
        ]
    return results
