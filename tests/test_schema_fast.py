"""``schema.certainly_valid`` may only ever say yes where jsonschema says yes.

``validate`` skips jsonschema (and its ~100 ms import) for documents the fast check vouches
for, so a fast check that accepted one invalid document would let it past every rule of the
contract. These tests hold it to its promise from both sides:

* the documents a node reads on every pass (settings, HEAD's snapshot, a head, a root) do take
  the fast path, or the no-op pass pays for jsonschema again (bench/noop.py);
* for documents mutated at random from those, whenever the fast check says yes, jsonschema,
  asked directly, finds no error. Every ``assert_invalid`` in tests/test_schemas.py also goes
  through ``validate`` and so through the fast check first.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core import schema
from reconciler.core.schema import SchemaName, certainly_valid
from tests.support.signing import RepositorySimulator, base_snapshot

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
PIN = "@sha256:" + "ab" * 32


def _snapshot() -> dict[str, Any]:
    body = base_snapshot()
    body["models"].append(
        {
            "name": "big-llm",
            "version": "2024.06",
            "files": [
                {
                    "path": f"weights/shard-{i}.safetensors",
                    "size": 1 << 30,
                    "digest": "sha256:" + f"{i:02x}" * 32,
                    "urls": [
                        f"models/big-llm/shard-{i}",
                        f"https://mirror.example.net:8443/big-llm/shard-{i}",
                    ],
                }
                for i in range(3)
            ],
            "runtime": "llm",
            "min_vram_mib": 24576,
            "tasks": ["chat", "embed"],
        }
    )
    body["runtimes"] = [
        {
            "name": "llm",
            "image": "ghcr.io/resultity/runtime:1.2" + PIN,
            "command": ["serve", "--port", "8000"],
            "env": {"HF_HOME": "/models", "_X1": ""},
            "models": ["tiny-llm:v1", "big-llm:2024.06"],
            "model_mount": "/srv/models",
            "devices": ["nvidia.com/gpu=all"],
            "ports": [{"container": 8000, "host": 18000, "protocol": "tcp"}],
            "health": {"command": ["true"], "interval_s": 1, "retries": 3},
            "update": "stop-first",
            "notify": "signal:HUP",
        },
        {"name": "embedder", "image": "ghcr.io/resultity/embed" + PIN, "update": "start-first"},
    ]
    return RepositorySimulator(now=1_700_000_000).snapshot_payload(7, body=body)


def _head() -> dict[str, Any]:
    return {
        "network": "testnet",
        "serial": 7,
        "config_digest": "sha256:" + "ab" * 32,
        "issued_at": "2024-02-29T23:59:59Z",
        "expires": "2024-03-08T00:00:00Z",
    }


def _head_with_rollout() -> dict[str, Any]:
    return {
        **_head(),
        "rollout": {
            "salt": "canaries-2024",
            "waves": [
                {"at": "2024-03-01T00:00:00Z", "percent": 1},
                {"at": "2024-03-01T06:00:00Z", "percent": 25},
                {"at": "2024-03-02T00:00:00Z", "percent": 100},
            ],
        },
    }


def _root() -> dict[str, Any]:
    return RepositorySimulator(now=1_700_000_000).root_payload(2, keys=["k1", "k2"], threshold=2)


def _settings() -> dict[str, Any]:
    return {
        "origin": "https://origin.example.net:8443/testnet",
        "network": "testnet",
        "root": "/etc/reconciler/root.json",
        "state_dir": "/var/lib/reconciler",
        "podman_url": "unix:///run/podman/podman.sock",
        "registry_auth_file": "/etc/reconciler/auth.json",
        "hooks_dir": "/etc/reconciler/hooks",
        "hook_timeout_s": 2.5,
        "keep_applied": 2,
        "disk_reserve_bytes": 1 << 30,
        "download_concurrency": 4,
        "verify_interval_s": 0,
        "vram_mib": 24576,
        "opt_out_subclouds": ["eu-small"],
        "metrics_path": "/var/lib/node_exporter/reconciler.prom",
        "log_format": "json",
    }


def _docs_example() -> dict[str, Any]:
    example: dict[str, Any] = json.loads((REPO_ROOT / "docs/examples/snapshot.json").read_bytes())
    example.update(serial=1, issued_at="2024-01-01T00:00:00Z", expires="2024-02-01T00:00:00Z")
    return example


SEEDS: list[tuple[SchemaName, dict[str, Any]]] = [
    ("snapshot", _snapshot()),
    ("snapshot", _docs_example()),
    ("head", _head()),
    ("head", _head_with_rollout()),
    ("root", _root()),
    ("settings", _settings()),
]


_SEEDS_AS_WRITTEN = [repr(document) for _, document in SEEDS]


def jsonschema_errors(name: SchemaName, document: object) -> list[str]:
    """What jsonschema itself says, with no fast path in front of it."""
    return [error.message for error in schema._validator(name).iter_errors(document)]


@pytest.mark.parametrize(
    ("name", "document"), SEEDS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SEEDS)]
)
def test_the_documents_a_node_reads_take_the_fast_path(name: SchemaName, document: Any) -> None:
    assert jsonschema_errors(name, document) == []
    assert certainly_valid(name, document)


def test_a_valid_snapshot_is_accepted_without_importing_jsonschema() -> None:
    script = (
        "import json, sys\n"
        "from reconciler.core.schema import validate\n"
        "for name, document in json.loads(sys.stdin.read()):\n"
        "    validate(name, document)\n"
        "print(sorted(m for m in ('jsonschema', 'referencing') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(SEEDS),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.stdout.strip() == "[]"


# ---- random mutations ------------------------------------------------------------------------

# Values chosen to sit on the edges of the rules: types JSON confuses, lengths, patterns with a
# trailing newline, calendar dates that do not exist, URLs that are not URI references, names
# that are reserved.
TRICKY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7.0,
    1.5,
    float("nan"),
    float("inf"),
    2**53,
    2**53 + 1,
    2**64,
    "",
    " ",
    "a",
    "a\n",
    "\n",
    "blobs",
    "x" * 129,
    "x" * 5000,
    "..",
    "../etc",
    "/abs",
    "a//b",
    "//host/x",
    "a:b",
    "http://",
    "http://[::1]/x",
    "http://h/%zz",
    "https://h/a b",
    "file:///x",
    "ftp://h/x",
    "ä",
    "١٢٣",
    "\x00",
    "sha256:" + "AB" * 32,
    "sha256:" + "ab" * 32,
    "sha256:" + "ab" * 32 + "\n",
    "2024-02-30T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-02-29T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T00:00:60Z",
    "0000-01-01T00:00:00Z",
    "2024-01-01T00:00:00z",
    "testnet",
    "mainnet",
    "devnet",
    "stop-first",
    "start-first",
    "signal:HUP",
    "signal:KILL",
    "nvidia.com/gpu=all",
    "unix:///run/podman.sock",
    "ghcr.io/x/y" + PIN,
    "ghcr.io/x/y:latest",
    [],
    [1],
    ["a", "a"],
    ["a", "b"],
    {},
    {"command": ["true"]},
    {"container": 80, "host": 80},
]


_TRICKY_AS_WRITTEN = repr(TRICKY)  # a mutation that edited a shared value would change this


def _places(document: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``document`` (the document itself is ``()``)."""
    found = [path]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _places(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _places(value, (*path, index))
    return found


def _get(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        document = document[part]
    return document


def _mutate(document: Any, data: st.DataObject) -> Any:
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(_places(document)), label="where")
        target = _get(document, path)
        kinds = ["replace", "tweak"]
        if isinstance(target, dict):
            kinds += ["drop-key", "add-key"]
        if isinstance(target, list):
            kinds += ["drop-item", "repeat-item", "append"]
        kind = data.draw(st.sampled_from(kinds), label="kind")
        replacement: Any
        if kind == "replace":
            replacement = _tricky(data)
        elif kind == "tweak":
            replacement = data.draw(_tweaks(target), label="tweaked")
        elif kind == "drop-key" and target:
            target.pop(data.draw(st.sampled_from(sorted(target)), label="key"))
            continue
        elif kind == "add-key":
            key = data.draw(st.sampled_from(["extra", "update", "ports", "else", "name"]))
            target[key] = _tricky(data)
            continue
        elif kind == "drop-item" and target:
            target.pop(data.draw(st.integers(0, len(target) - 1), label="index"))
            continue
        elif kind == "repeat-item" and target:
            target.append(copy.deepcopy(target[0]))
            continue
        elif kind == "append":
            target.append(_tricky(data))
            continue
        else:
            continue
        if path:
            _get(document, path[:-1])[path[-1]] = replacement
        else:
            document = replacement
    return document


def _tricky(data: st.DataObject) -> Any:
    # A copy: the lists and dicts in TRICKY must not become shared parts of a document.
    return copy.deepcopy(data.draw(st.sampled_from(TRICKY), label="value"))


def _tweaks(value: Any) -> st.SearchStrategy[Any]:
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, -value, float(value), value * 2**40])
    if isinstance(value, float):
        whole = [int(value)] if math.isfinite(value) else []
        return st.sampled_from([-value, value * 1e6, *whole])
    if isinstance(value, str):
        return st.sampled_from(
            [value + "\n", value.upper(), value[:-1], value + "/..", ":" + value, value * 40]
        )
    return st.sampled_from(TRICKY).map(copy.deepcopy)  # not the shared objects themselves


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.sampled_from(range(len(SEEDS))), data=st.data())
def test_the_fast_path_never_accepts_what_jsonschema_refuses(
    seed: int, data: st.DataObject
) -> None:
    name, document = SEEDS[seed]
    mutated = _mutate(document, data)
    assert repr(TRICKY) == _TRICKY_AS_WRITTEN and repr(SEEDS[seed][1]) == _SEEDS_AS_WRITTEN[seed]
    if certainly_valid(name, mutated):
        assert jsonschema_errors(name, mutated) == [], json.dumps(mutated, default=str)[:500]


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("head", {"issued_at": "2024-02-30T00:00:00Z"}),
        ("head", {"serial": True}),
        ("head", {"serial": 7.0}),
        ("head", {"config_digest": "sha256:" + "ab" * 32 + "\n"}),
        ("head", {"rollout": {"waves": []}}),
        ("head", {"rollout": {"waves": [{"at": "2024-03-01T00:00:00Z", "percent": 101}]}}),
        ("head", {"rollout": {"waves": [{"at": "2024-02-30T00:00:00Z", "percent": 1}]}}),
        ("head", {"rollout": {"waves": [{"at": "2024-03-01T00:00:00Z", "percent": True}]}}),
        (
            "head",
            {"rollout": {"salt": "", "waves": [{"at": "2024-03-01T00:00:00Z", "percent": 1}]}},
        ),
        ("head", {"rollout": {"waves": [{"at": "2024-03-01T00:00:00Z", "percent": 1}] * 33}}),
        ("head", {"rollout": {"waves": [{"at": "2024-03-01T00:00:00Z", "percent": 1}], "x": 1}}),
        ("root", {"threshold": 0}),
        ("root", {"keys": []}),
        ("settings", {"origin": "https://h/a b"}),
        ("settings", {"opt_out_subclouds": ["a", "a"]}),
        ("settings", {"hook_timeout_s": 0}),
    ],
)
def test_the_fast_path_refuses_known_bad_documents(
    name: SchemaName, change: dict[str, Any]
) -> None:
    document = copy.deepcopy(next(d for n, d in SEEDS if n == name))
    document.update(change)
    assert not certainly_valid(name, document)
    assert jsonschema_errors(name, document) != []


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda s: s["models"][1].update(name="blobs"), id="reserved-model-name"),
        pytest.param(
            lambda s: s["runtimes"][0].update(update="start-first"), id="start-first+ports"
        ),
        pytest.param(lambda s: s["runtimes"][0]["env"].update({"1X": "v"}), id="env-name"),
        pytest.param(lambda s: s["runtimes"][0].update(command=[]), id="empty-command"),
        pytest.param(lambda s: s["models"][1]["files"][0].update(urls=["a b"]), id="url-space"),
        pytest.param(lambda s: s["runtimes"][0].pop("image"), id="missing-image"),
        pytest.param(lambda s: s["runtimes"][0].update(extra=1), id="unknown-field"),
    ],
)
def test_the_fast_path_refuses_bad_snapshots(edit: Any) -> None:
    document = _snapshot()
    edit(document)
    assert not certainly_valid("snapshot", document)
    assert jsonschema_errors("snapshot", document) != []
