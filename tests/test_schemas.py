"""The v1 JSON schemas (docs/contract.md §1, §2) and the strict JSON reader run before them."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler.core.documents import JsonError, loads_strict
from reconciler.core.schema import SchemaError, schema_dir, validate
from tests.support.signing import RepositorySimulator, base_snapshot

HEX = "ab" * 32
PIN = "@sha256:" + HEX
REPO_ROOT = Path(__file__).resolve().parent.parent


def snapshot(**changes: Any) -> dict[str, Any]:
    document = RepositorySimulator(now=1_700_000_000).snapshot_payload(7, body=base_snapshot())
    document.update(changes)
    return document


def runtime(**fields: Any) -> dict[str, Any]:
    return {"name": "llm", "image": "ghcr.io/resultity/runtime:1.2" + PIN, **fields}


def with_runtime(**fields: Any) -> dict[str, Any]:
    return snapshot(runtimes=[runtime(**fields)])


def with_file_path(path: str) -> dict[str, Any]:
    document = snapshot()
    document["models"][0]["files"][0]["path"] = path
    return document


def head(**changes: Any) -> dict[str, Any]:
    document = {
        "network": "testnet",
        "serial": 7,
        "config_digest": "sha256:" + HEX,
        "issued_at": "2024-01-01T00:00:00Z",
        "expires": "2024-01-08T00:00:00Z",
    }
    document.update(changes)
    return document


def assert_invalid(schema: str, document: Any, *, where: str | None = None) -> None:
    with pytest.raises(SchemaError) as caught:
        validate(schema, document)  # type: ignore[arg-type]
    if where is not None:
        assert str(caught.value).startswith(f"{where}: "), str(caught.value)


# ---- the schema files themselves -----------------------------------------------------------


@pytest.mark.parametrize("name", ["common", "head", "root", "settings", "snapshot"])
def test_schema_file_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = json.loads((schema_dir() / f"{name}.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)


def test_example_snapshot_in_the_docs_is_valid_once_published() -> None:
    example = json.loads((REPO_ROOT / "docs/examples/snapshot.json").read_bytes())
    example.update(serial=1, issued_at="2024-01-01T00:00:00Z", expires="2024-02-01T00:00:00Z")
    validate("snapshot", example)


def test_accepts_a_runtime_using_every_field() -> None:
    validate(
        "snapshot",
        with_runtime(
            command=["serve", "--port", "8000"],
            env={"HF_HOME": "/models", "_X1": ""},
            models=["tiny-llm:v1"],
            model_mount="/srv/models",
            devices=["nvidia.com/gpu=all", "amd.com/gpu=0"],
            ports=[{"container": 8000, "host": 18000, "protocol": "tcp"}],
            health={"command": ["true"], "interval_s": 1, "retries": 3},
            update="stop-first",
            notify="signal:HUP",
        ),
    )


# ---- times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2024-13-01T00:00:00Z",  # month 13
        "2024-00-10T00:00:00Z",
        "2024-01-32T00:00:00Z",
        "2023-02-29T00:00:00Z",  # not a leap year
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:60:00Z",
        "2024-01-01T23:59:60Z",  # a leap second is not a time a node can compare
        "0000-01-01T00:00:00Z",
        "2024-01-01T00:00:00+00:00",
        "2024-01-01T00:00:00z",
        "2024-01-01 00:00:00Z",
        "2024-01-01T00:00:00.5Z",
        "2024-01-01T00:00:00Z\n",
        "2024-1-01T00:00:00Z",
    ],
)
def test_rejects_malformed_times(text: str) -> None:
    assert_invalid("head", head(expires=text), where="expires")


def test_accepts_a_leap_day() -> None:
    validate("head", head(expires="2024-02-29T23:59:59Z"))


# ---- integers ---------------------------------------------------------------------------


def test_accepts_serial_of_2_to_the_53() -> None:
    validate("head", head(serial=2**53))


@pytest.mark.parametrize("serial", [0, -1, 2**53 + 1, "7", True, None])
def test_rejects_serials_out_of_range_or_of_another_type(serial: object) -> None:
    assert_invalid("head", head(serial=serial), where="serial")


@pytest.mark.parametrize("number", [b"7.0", b"7e0", b"0.7e1"])
def test_rejects_an_integer_field_written_as_a_float(number: bytes) -> None:
    document = loads_strict(b'{"serial": ' + number + b"}")
    assert_invalid("head", head(**document), where="serial")
    with_float = snapshot()
    with_float["jobs"]["max_tokens"] = loads_strict(number)
    assert_invalid("snapshot", with_float, where="jobs/max_tokens")


# ---- model file paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../x",
        "a/..",
        "..",
        "./a",
        "a/./b",
        ".",
        "/abs",
        "/",
        "a\\b",
        "..\\x",
        "a\x00b",
        "",
        "a//b",
        "a/",
        "x" * 256,
    ],
)
def test_rejects_unsafe_model_file_paths(path: str) -> None:
    assert_invalid("snapshot", with_file_path(path), where="models/0/files/0/path")


@pytest.mark.parametrize(
    "path", ["config.json", "a/b/c.bin", "..hidden", "a/...", "weights-00001-of-00002.safetensors"]
)
def test_accepts_relative_model_file_paths(path: str) -> None:
    validate("snapshot", with_file_path(path))


def test_rejects_a_file_url_that_is_not_a_uri_reference() -> None:
    document = snapshot()
    document["models"][0]["files"][0]["urls"] = ["http://mirror/a b"]
    assert_invalid("snapshot", document, where="models/0/files/0/urls/0")


# ---- runtimes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        "nginx",
        "nginx:latest",
        "nginx@sha256:abc",
        "nginx@sha256:" + HEX.upper(),
        "nginx@sha512:" + HEX + HEX,
        "NGINX" + PIN,
        "nginx" + PIN + "\n",
        " nginx" + PIN,
    ],
)
def test_rejects_images_not_pinned_by_digest(image: str) -> None:
    assert_invalid("snapshot", with_runtime(image=image), where="runtimes/0/image")


@pytest.mark.parametrize(
    "image", ["nginx" + PIN, "localhost:5000/a/b" + PIN, "ghcr.io/org/img:v1.2_rc" + PIN]
)
def test_accepts_images_pinned_by_digest(image: str) -> None:
    validate("snapshot", with_runtime(image=image))


def test_rejects_start_first_together_with_ports() -> None:
    assert_invalid(
        "snapshot",
        with_runtime(update="start-first", ports=[{"container": 80, "host": 8080}]),
        where="runtimes/0/update",
    )


def test_accepts_start_first_without_ports() -> None:
    validate("snapshot", with_runtime(update="start-first"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("notify", "signal:KILL"),
        ("notify", "restart\n"),
        ("devices", ["/dev/nvidia0"]),
        ("model_mount", "/models/../etc"),
        ("model_mount", "models"),
        ("env", {"BAD-NAME": "x"}),
        ("env", {"A": "nul\x00"}),
        ("command", ["nul\x00"]),
        ("ports", [{"container": 80, "host": 0}]),
        ("privileged", True),
        ("name", "llm\n"),
        ("name", "LLM"),
    ],
)
def test_rejects_runtime_fields_outside_the_contract(field: str, value: object) -> None:
    assert_invalid("snapshot", with_runtime(**{field: value}))


@pytest.mark.parametrize("name", ["tiny-llm\n", "Tiny", "-x", "a" * 65, ""])
def test_rejects_model_names_outside_the_name_pattern(name: str) -> None:
    document = snapshot()
    document["models"][0]["name"] = name
    assert_invalid("snapshot", document, where="models/0/name")


# ---- unknown fields anywhere --------------------------------------------------------------


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "top level": lambda s: s.update(policy="x"),
    "model": lambda s: s["models"][0].update(license="x"),
    "model file": lambda s: s["models"][0]["files"][0].update(mode=493),
    "jobs": lambda s: s["jobs"].update(priority=1),
    "ttl": lambda s: s["ttl"].update(jitter_s=1),
    "updates": lambda s: s["updates"].update(kernel={"version": "1", "digest": "sha256:" + HEX}),
    "subcloud": lambda s: s["participation"]["subclouds"][0].update(weight=2),
}


@pytest.mark.parametrize("where", sorted(EDITS))
def test_rejects_unknown_fields_at_every_level(where: str) -> None:
    document = snapshot()
    EDITS[where](document)
    assert_invalid("snapshot", document)


def test_rejects_head_digest_in_upper_case() -> None:
    assert_invalid("head", head(config_digest="sha256:" + HEX.upper()), where="config_digest")


@pytest.mark.parametrize(
    "change",
    [
        {"threshold": 0},
        {"threshold": 33},
        {"keys": []},
        {"version": 0},
        {"network": "devnet"},
    ],
)
def test_rejects_roots_outside_the_contract(change: dict[str, Any]) -> None:
    root = RepositorySimulator(now=1_700_000_000).root_payload(1, keys=["k1"])
    root.update(copy.deepcopy(change))
    assert_invalid("root", root)


# ---- strict JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"serial": 1, "serial": 2}',
        b'{"a": {"b": 1, "b": 1}}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": 9007199254740993}',
        b'{"a": -9007199254740993}',
        b'{"a": ' + b"1" * 400 + b"}",
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\xff"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": 1} x',
        b"",
    ],
)
def test_strict_json_rejects(data: bytes) -> None:
    with pytest.raises(JsonError):
        loads_strict(data)


def test_strict_json_keeps_what_plain_json_reads() -> None:
    text = b'{"a": [1, -2.5, "\\u00e9", true, null], "b": {"c": 9007199254740992}}'
    assert loads_strict(text) == json.loads(text)
