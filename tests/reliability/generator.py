"""Random but valid snapshots for the crash campaign and the soak: a node's life in steps.

``SnapshotGenerator.next_body()`` returns a snapshot body (without serial and times, which the
``RepositorySimulator`` adds) that differs from the previous one by one to three random
changes: a model added, changed in place (same id, other bytes), moved to a new version or
dropped; a runtime added, dropped, moved to another test image, given other env or models,
another update strategy; the jobs changed (so runtimes are notified). The model files are
written into the origin folder, so every ``urls`` entry is served by the test's file server.

Everything it publishes is what a healthy network would publish: no snapshot here is meant
to fail, so the campaign can demand convergence after every kill. Randomness comes from one
``random.Random(seed)``; a failing round is replayed with the seed it reports.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.signing import base_snapshot

__all__ = ["SnapshotGenerator"]

MODEL_NAMES = ("alpha", "beta", "gamma", "delta")
RUNTIME_NAMES = ("r0", "r1", "r2")
MAX_FILE_BYTES = 192 * 1024  # keeps a round's downloads short while still spanning reads


class SnapshotGenerator:
    def __init__(
        self,
        *,
        origin: Path,
        images: dict[str, str],
        seed: int,
        max_runtimes: int = 2,
        max_models: int = 3,
    ) -> None:
        self.origin = origin
        self.images = images  # "web", "web2", "sleeper" → pinned reference
        self.rng = random.Random(seed)
        self.max_runtimes = max_runtimes
        self.max_models = max_models
        self.models: dict[str, dict[str, Any]] = {}  # name → model entry
        self.runtimes: dict[str, dict[str, Any]] = {}  # name → runtime entry
        self.max_tokens = 4096
        self.counter = 0
        self.changes: list[str] = []  # what the last next_body() did, for failure reports

    # ---- the body ------------------------------------------------------------------------

    def next_body(self, *, changes: int | None = None) -> dict[str, Any]:
        self.changes = []
        for _ in range(changes if changes is not None else self.rng.randint(1, 3)):
            self._mutate()
        return self.body()

    def body(self) -> dict[str, Any]:
        body = base_snapshot()
        body["models"] = [copy.deepcopy(m) for _, m in sorted(self.models.items())]
        body["runtimes"] = [copy.deepcopy(r) for _, r in sorted(self.runtimes.items())]
        body["jobs"]["max_tokens"] = self.max_tokens
        return body

    def _mutate(self) -> None:
        moves: list[Callable[[], None]] = [self._jobs]
        if len(self.models) < self.max_models:
            moves += [self._add_model] * 2
        if self.models:
            moves += [self._change_model, self._new_version, self._drop_model]
        if len(self.runtimes) < self.max_runtimes:
            moves += [self._add_runtime] * 2
        if self.runtimes:
            moves += [self._change_image, self._change_runtime, self._drop_runtime]
        self.rng.choice(moves)()

    # ---- models --------------------------------------------------------------------------

    def _files(self, name: str, version: str) -> list[dict[str, Any]]:
        files = []
        for index in range(self.rng.randint(1, 3)):
            self.counter += 1
            path = self.rng.choice([f"part-{index}.bin", f"sub/dir/part-{index}.bin"])
            size = self.rng.randint(0, MAX_FILE_BYTES)
            data = self.rng.randbytes(size)
            digest = hashlib.sha256(data).hexdigest()
            served = f"models/{name}/{digest}"
            target = self.origin / served
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            files.append(
                {"path": path, "size": size, "digest": f"sha256:{digest}", "urls": [served]}
            )
        unique = {f["path"]: f for f in files}  # two draws may pick one path
        return list(unique.values())

    def _add_model(self) -> None:
        name = self.rng.choice([n for n in MODEL_NAMES if n not in self.models])
        self.models[name] = {"name": name, "version": "v1", "files": self._files(name, "v1")}
        self.changes.append(f"add model {name}:v1")

    def _change_model(self) -> None:
        name = self.rng.choice(sorted(self.models))
        model = self.models[name]
        model["files"] = self._files(name, model["version"])
        self.changes.append(f"change files of {name}:{model['version']} in place")

    def _new_version(self) -> None:
        name = self.rng.choice(sorted(self.models))
        model = self.models[name]
        old = f"{name}:{model['version']}"
        version = f"v{int(model['version'][1:]) + 1}"
        model["version"] = version
        model["files"] = self._files(name, version)
        for runtime in self.runtimes.values():
            runtime["models"] = [f"{name}:{version}" if m == old else m for m in runtime["models"]]
        self.changes.append(f"move {old} to {version}")

    def _drop_model(self) -> None:
        name = self.rng.choice(sorted(self.models))
        model = self.models.pop(name)
        gone = f"{name}:{model['version']}"
        for runtime in self.runtimes.values():
            runtime["models"] = [m for m in runtime["models"] if m != gone]
        self.changes.append(f"drop model {gone}")

    def _model_ids(self) -> list[str]:
        ids = [f"{n}:{m['version']}" for n, m in sorted(self.models.items())]
        return sorted(self.rng.sample(ids, self.rng.randint(0, len(ids))))

    # ---- runtimes ------------------------------------------------------------------------

    def _runtime(self, name: str, image: str) -> dict[str, Any]:
        runtime: dict[str, Any] = {
            "name": name,
            "image": self.images[image],
            "models": self._model_ids(),
            "env": {"GENERATION": str(self.counter)},
            "update": self.rng.choice(["stop-first", "start-first"]),
        }
        # Only the sleeper image traps SIGHUP; the web images' shell would die of it.
        runtime["notify"] = "signal:HUP" if image == "sleeper" else "restart"
        return runtime

    def _image_name(self, runtime: dict[str, Any]) -> str:
        return next(k for k, v in self.images.items() if v == runtime["image"])

    def _add_runtime(self) -> None:
        name = self.rng.choice([n for n in RUNTIME_NAMES if n not in self.runtimes])
        image = self.rng.choice(sorted(self.images))
        self.runtimes[name] = self._runtime(name, image)
        self.changes.append(f"add runtime {name} ({image})")

    def _change_image(self) -> None:
        name = self.rng.choice(sorted(self.runtimes))
        current = self._image_name(self.runtimes[name])
        image = self.rng.choice([i for i in sorted(self.images) if i != current])
        self.runtimes[name] = self._runtime(name, image)
        self.changes.append(f"runtime {name}: image {current} → {image}")

    def _change_runtime(self) -> None:
        name = self.rng.choice(sorted(self.runtimes))
        runtime = self.runtimes[name]
        self.counter += 1
        runtime["env"] = {"GENERATION": str(self.counter)}
        runtime["models"] = self._model_ids()
        runtime["update"] = self.rng.choice(["stop-first", "start-first"])
        self.changes.append(f"runtime {name}: env, models and update strategy")

    def _drop_runtime(self) -> None:
        name = self.rng.choice(sorted(self.runtimes))
        del self.runtimes[name]
        self.changes.append(f"drop runtime {name}")

    def _jobs(self) -> None:
        self.max_tokens = self.rng.choice([1024, 2048, 4096, 8192])
        self.changes.append(f"jobs: max_tokens {self.max_tokens}")
