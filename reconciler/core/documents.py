"""Typed, immutable views of the v1 documents (docs/contract.md §2) and their strict JSON parsing.

Pure: bytes or parsed objects in, frozen dataclasses out. No I/O, no clock. A payload reaches
these classes only after its schema check, so constructors trust the shapes and only add the
checks a schema cannot express (threshold ≤ key count, keyid = sha256(public), model ids).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from reconciler.core.rollout import Rollout

__all__ = [
    "Head",
    "HealthCheck",
    "Jobs",
    "JsonError",
    "ModelChunks",
    "ModelFile",
    "ModelSpec",
    "ModelTorrent",
    "Participation",
    "PortMapping",
    "Root",
    "RootKey",
    "RuntimeSpec",
    "Snapshot",
    "Subcloud",
    "Ttl",
    "digest_of",
    "format_time",
    "loads_strict",
    "parse_time",
]

MAX_SAFE_INTEGER = 2**53


class JsonError(ValueError):
    """Bytes that are not strict JSON (bad UTF-8, duplicate keys, NaN, huge numbers)."""


def _reject_constant(name: str) -> Any:
    raise JsonError(f"{name} is not allowed in JSON documents")


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JsonError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise JsonError("integer out of range")
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise JsonError("integer out of range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError("number out of range")
    return value


def loads_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON bytes, rejecting a BOM, duplicate keys, NaN/Infinity and huge numbers."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise JsonError("a byte order mark is not allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except JsonError:
        raise
    except (ValueError, RecursionError) as exc:
        raise JsonError(f"not valid JSON ({str(exc).splitlines()[0][:120]})") from exc


def digest_of(data: bytes) -> str:
    """The contract's digest form: ``sha256:`` + lowercase hex."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_time(text: str) -> int:
    """``YYYY-MM-DDTHH:MM:SSZ`` → seconds since the epoch (UTC)."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


Network = Literal["testnet", "mainnet"]


@dataclass(frozen=True)
class RootKey:
    keyid: str
    public: bytes  # 32 raw Ed25519 public-key bytes


@dataclass(frozen=True)
class Root:
    version: int
    network: Network
    threshold: int
    keys: tuple[RootKey, ...]
    expires: int  # epoch seconds

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> Root:
        keys = []
        for entry in obj["keys"]:
            public = bytes.fromhex(entry["public"])
            if hashlib.sha256(public).hexdigest() != entry["keyid"]:
                raise ValueError(f"keyid {entry['keyid'][:12]}… is not sha256 of its public key")
            keys.append(RootKey(keyid=entry["keyid"], public=public))
        if len({k.keyid for k in keys}) != len(keys):
            raise ValueError("a key is listed twice")
        if obj["threshold"] > len(keys):
            raise ValueError(f"threshold {obj['threshold']} exceeds the {len(keys)} keys listed")
        return cls(
            version=obj["version"],
            network=obj["network"],
            threshold=obj["threshold"],
            keys=tuple(keys),
            expires=parse_time(obj["expires"]),
        )

    def key_by_id(self) -> dict[str, bytes]:
        return {k.keyid: k.public for k in self.keys}


@dataclass(frozen=True)
class Head:
    network: Network
    serial: int
    config_digest: str
    issued_at: int
    expires: int
    rollout: Rollout | None = None  # None: every node takes the snapshot at once (§8)

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> Head:
        # Imported here: the rollout module uses this module's time functions.
        from reconciler.core.rollout import Rollout

        return cls(
            network=obj["network"],
            serial=obj["serial"],
            config_digest=obj["config_digest"],
            issued_at=parse_time(obj["issued_at"]),
            expires=parse_time(obj["expires"]),
            rollout=Rollout.from_payload(obj["rollout"]) if "rollout" in obj else None,
        )


@dataclass(frozen=True)
class ModelChunks:
    """Optional per-chunk digests of a model file: the file cut into ``size``-byte chunks
    (the last one shorter), one ``sha256:<hex>`` each, so wrong bytes cost only their chunk."""

    size: int
    digests: tuple[str, ...]


@dataclass(frozen=True)
class ModelTorrent:
    """Optional BitTorrent v1 pieces of a model file (docs/contract.md §12): with the file's
    size and digest, enough to rebuild its single-file torrent without asking anyone, plus
    where the snapshot says peers are found (its ``p2p`` object, the same for every file)."""

    piece_length: int
    pieces: bytes = field(repr=False)  # 20-byte SHA-1 of each piece, in order
    trackers: tuple[str, ...] = ()
    dht: bool = False

    @property
    def piece_count(self) -> int:
        return len(self.pieces) // 20


@dataclass(frozen=True)
class ModelFile:
    path: str
    size: int
    digest: str
    urls: tuple[str, ...]
    chunks: ModelChunks | None = None
    bt: ModelTorrent | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    files: tuple[ModelFile, ...]
    runtime: str | None = None
    min_vram_mib: int | None = None
    tasks: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class PortMapping:
    container: int
    host: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class HealthCheck:
    command: tuple[str, ...]
    interval_s: int = 2
    timeout_s: int = 10
    retries: int = 15
    start_period_s: int = 0


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    image: str
    command: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    models: tuple[str, ...] = ()
    model_mount: str = "/models"
    devices: tuple[str, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    health: HealthCheck | None = None
    update: Literal["stop-first", "start-first"] = "stop-first"
    notify: str = "restart"


@dataclass(frozen=True)
class Jobs:
    max_tokens: int
    max_queue: int
    timeout_s: int


@dataclass(frozen=True)
class Subcloud:
    id: str
    enabled: bool
    models: tuple[str, ...] = ()
    min_vram_mib: int | None = None


@dataclass(frozen=True)
class Participation:
    modes: tuple[str, ...]
    subclouds: tuple[Subcloud, ...]


@dataclass(frozen=True)
class Ttl:
    poll_s: int
    heartbeat_s: int
    retry_min_s: int
    retry_max_s: int
    cache_s: int


@dataclass(frozen=True)
class Snapshot:
    network: Network
    serial: int
    issued_at: int
    expires: int
    models: tuple[ModelSpec, ...]
    runtimes: tuple[RuntimeSpec, ...]
    jobs: Jobs
    participation: Participation
    ttl: Ttl
    updates: dict[str, dict[str, str]] = field(hash=False, compare=False)
    raw: dict[str, Any] = field(hash=False, compare=False, repr=False)
    reports_url: str | None = None  # where nodes PUT their reports (§9), as written

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> Snapshot:
        p2p = obj.get("p2p", {})
        hints = (tuple(p2p.get("trackers", ())), bool(p2p.get("dht", False)))
        models = tuple(_model(m, hints) for m in obj["models"])
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError("a model id is listed twice")
        for model in models:
            paths = [f.path for f in model.files]
            if len(set(paths)) != len(paths):
                raise ValueError(f"model {model.id} lists a file path twice")
        runtimes = tuple(_runtime(r) for r in obj["runtimes"])
        names = [r.name for r in runtimes]
        if len(set(names)) != len(names):
            raise ValueError("a runtime name is listed twice")
        known = set(ids)
        for runtime in runtimes:
            for wanted in runtime.models:
                if wanted not in known:
                    raise ValueError(f"runtime {runtime.name} mounts unknown model {wanted}")
        host_ports = [(p.host, p.protocol) for r in runtimes for p in r.ports]
        if len(set(host_ports)) != len(host_ports):
            raise ValueError("two runtimes publish the same host port")
        part = obj["participation"]
        return cls(
            network=obj["network"],
            serial=obj["serial"],
            issued_at=parse_time(obj["issued_at"]),
            expires=parse_time(obj["expires"]),
            models=models,
            runtimes=runtimes,
            jobs=Jobs(**obj["jobs"]),
            participation=Participation(
                modes=tuple(part["modes"]),
                subclouds=tuple(
                    Subcloud(
                        id=s["id"],
                        enabled=s["enabled"],
                        models=tuple(s.get("models", ())),
                        min_vram_mib=s.get("min_vram_mib"),
                    )
                    for s in part["subclouds"]
                ),
            ),
            ttl=Ttl(**obj["ttl"]),
            updates=obj["updates"],
            raw=obj,
            reports_url=obj["reports"]["url"] if "reports" in obj else None,
        )


def _model(obj: dict[str, Any], hints: tuple[tuple[str, ...], bool] = ((), False)) -> ModelSpec:
    return ModelSpec(
        name=obj["name"],
        version=obj["version"],
        files=tuple(
            ModelFile(
                path=f["path"],
                size=f["size"],
                digest=f["digest"],
                urls=tuple(f["urls"]),
                chunks=_chunks(f["chunks"]) if "chunks" in f else None,
                bt=_torrent(f, hints) if "bt" in f else None,
            )
            for f in obj["files"]
        ),
        runtime=obj.get("runtime"),
        min_vram_mib=obj.get("min_vram_mib"),
        tasks=tuple(obj.get("tasks", ())),
    )


def _chunks(obj: dict[str, Any]) -> ModelChunks:
    return ModelChunks(size=obj["size"], digests=tuple(obj["digests"]))


def _torrent(file: dict[str, Any], hints: tuple[tuple[str, ...], bool]) -> ModelTorrent | None:
    """The file's ``bt`` object, or None when its pieces do not fit its size: such a file is
    fetched over HTTP as if it had none (the snapshot stays valid)."""
    obj = file["bt"]
    try:
        pieces = base64.b64decode(obj["pieces"], validate=True)
    except ValueError:
        return None
    length = obj["piece_length"]
    if len(pieces) != 20 * max(1, -(-file["size"] // length)):
        return None
    return ModelTorrent(piece_length=length, pieces=pieces, trackers=hints[0], dht=hints[1])


def _runtime(obj: dict[str, Any]) -> RuntimeSpec:
    health = obj.get("health")
    command = obj.get("command")
    return RuntimeSpec(
        name=obj["name"],
        image=obj["image"],
        command=tuple(command) if command is not None else None,
        env=tuple(sorted(obj.get("env", {}).items())),
        models=tuple(obj.get("models", ())),
        model_mount=obj.get("model_mount", "/models"),
        devices=tuple(obj.get("devices", ())),
        ports=tuple(
            PortMapping(container=p["container"], host=p["host"], protocol=p.get("protocol", "tcp"))
            for p in obj.get("ports", ())
        ),
        health=HealthCheck(
            command=tuple(health["command"]),
            **{k: v for k, v in health.items() if k != "command"},
        )
        if health
        else None,
        update=obj.get("update", "stop-first"),
        notify=obj.get("notify", "restart"),
    )
