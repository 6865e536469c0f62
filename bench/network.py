"""The network side of a benchmark: a signed origin served on loopback, model files, nodes.

``SignedOrigin`` is the test suite's ``RepositorySimulator`` writing into the folder a
``FileServer`` serves (both reused from ``tests/support``). ``BenchNode`` is a node folder
initialised against it with the real ``reconcile init`` code; benchmarks drive it either
in-process (``node()``) or through the installed ``reconcile`` command (``argv()``).
Model files are written from one random block repeated, so gigabytes are made at disk speed
while every file still has its own digest.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import MIB, RECONCILE
from reconciler.agent.provision import initialise
from reconciler.config.settings import Settings, load_settings
from reconciler.history.node import Node
from tests.support.fileserver import FileServer
from tests.support.signing import Release, RepositorySimulator, base_snapshot

__all__ = [
    "BenchNode",
    "ModelFileOnDisk",
    "SignedOrigin",
    "model_entry",
    "serve_model_files",
    "snapshot_body",
    "write_model_file",
]

_BLOCK = 1 * MIB


class SignedOrigin:
    """A loopback HTTP origin whose documents are signed on demand (root 1 by key ``k1``)."""

    def __init__(self, folder: Path) -> None:
        self.server = FileServer(folder).start()
        self.simulator = RepositorySimulator(folder=self.server.root)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def root(self) -> Path:
        return self.server.root

    @property
    def root_envelope(self) -> bytes:
        return self.simulator.roots[1]

    def publish(self, body: dict[str, Any], *, serial: int | None = None) -> Release:
        return self.simulator.publish(serial, body=body)

    def close(self) -> None:
        self.server.close()


def snapshot_body(
    *,
    models: Sequence[dict[str, Any]] = (),
    runtimes: Sequence[dict[str, Any]] = (),
    ttl: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A valid snapshot body (the simulator adds serial and times)."""
    body = base_snapshot()
    body["models"] = list(models)
    body["runtimes"] = list(runtimes)
    body["participation"]["subclouds"] = []
    if ttl:
        body["ttl"].update(ttl)
    return body


@dataclass(frozen=True)
class ModelFileOnDisk:
    path: str  # inside the model
    size: int
    digest: str
    url: str  # relative to the origin


def write_model_file(target: Path, *, size: int, seed: str) -> str:
    """Write ``size`` bytes (a random 1 MiB block, repeated) and return their digest."""
    block = random.Random(seed).randbytes(_BLOCK)
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        left = size
        while left:
            piece = block if left >= _BLOCK else block[:left]
            handle.write(piece)
            digest.update(piece)
            left -= len(piece)
    return "sha256:" + digest.hexdigest()


def serve_model_files(
    origin_root: Path, sizes: Mapping[str, int], *, seed: str
) -> list[ModelFileOnDisk]:
    """Files of one model under ``files/<seed>/`` of the origin, each with its own content."""
    files = []
    for path, size in sizes.items():
        url = f"files/{seed}/{path}"
        digest = write_model_file(origin_root / url, size=size, seed=f"{seed}/{path}")
        files.append(ModelFileOnDisk(path=path, size=size, digest=digest, url=url))
    return files


def model_entry(name: str, version: str, files: Sequence[ModelFileOnDisk]) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "files": [
            {"path": f.path, "size": f.size, "digest": f.digest, "urls": [f.url]} for f in files
        ],
    }


class BenchNode:
    """A node's settings file and state folder under ``home``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.config = home / "config.toml"
        self.state_dir = home / "state"
        self.hooks_dir = home / "hooks"

    def init(self, origin_url: str, root_envelope: bytes, **settings: Any) -> BenchNode:
        """``reconcile init`` (the same code, in-process) with extra settings written to the
        file: a private hooks folder, and whatever the benchmark passes."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.hooks_dir.mkdir(exist_ok=True)
        root_file = self.home / "root.json"
        root_file.write_bytes(root_envelope)
        overrides: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "hooks_dir": str(self.hooks_dir),
            **settings,
        }
        initialise(
            config=str(self.config),
            overrides=overrides,
            origin=origin_url,
            root_file=root_file,
            network=None,
        )
        return self

    def settings(self) -> Settings:
        return load_settings(config=str(self.config), environ={})

    def node(self) -> Node:
        return Node(self.settings())

    def env(self) -> dict[str, str]:
        """The environment for a ``reconcile`` process: only this node's settings file."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RECONCILER_", "RECONCILE_")) and k != "CONTAINER_HOST"
        }
        env["RECONCILER_CONFIG"] = str(self.config)
        return env

    def argv(self, *args: str) -> list[str]:
        return [RECONCILE, *args]
