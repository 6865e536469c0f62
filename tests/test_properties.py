"""Properties of the parsing and trust core under arbitrary and mutated input (hypothesis).

Whatever bytes arrive from an origin, the core answers with a verdict or with one of the
project's own errors (``RejectedError``, ``EnvelopeError``, ``JsonError``); any other exception
is a crash that would take the agent down, and fails these tests.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.documents import JsonError, loads_strict
from reconciler.core.envelope import EnvelopeError, b64decode, parse_envelope
from reconciler.core.errors import RejectedError
from reconciler.core.trust import (
    verify_head,
    verify_initial_root,
    verify_next_root,
    verify_snapshot,
)
from tests.support.signing import (
    HEAD_TYPE,
    ROOT_TYPE,
    SNAPSHOT_TYPE,
    RepositorySimulator,
    base_snapshot,
    canonical,
    payload_of,
)

T = TypeVar("T")
NOW = 1_750_000_000.0
NETWORK = RepositorySimulator(now=NOW, root_keys=("k1", "k2"), threshold=1)
ROOT = verify_initial_root(NETWORK.roots[1], network="testnet").root

RICH_BODY = base_snapshot()
RICH_BODY["runtimes"] = [
    {
        "name": "llm",
        "image": "ghcr.io/resultity/runtime:1" + "@sha256:" + "ab" * 32,
        "command": ["serve"],
        "env": {"A": "1"},
        "models": ["tiny-llm:v1"],
        "model_mount": "/models",
        "devices": ["nvidia.com/gpu=all"],
        "ports": [{"container": 8000, "host": 18000, "protocol": "tcp"}],
        "health": {"command": ["true"], "interval_s": 1, "retries": 2},
        "update": "stop-first",
        "notify": "signal:HUP",
    }
]
RICH_BODY["participation"]["subclouds"][0].update(models=["tiny-llm:v1"], min_vram_mib=1)
RELEASE = NETWORK.release(5, body=RICH_BODY)
HEAD_PAYLOAD = json.loads(payload_of(RELEASE.head))
SNAPSHOT_PAYLOAD = json.loads(RELEASE.snapshot_payload)
ROOT_PAYLOAD = NETWORK.root_payload(2, keys=["k1", "k2"], threshold=1)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # raise it for a longer hunt
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["testnet", "sha256:" + "0" * 64, "2030-01-01T00:00:00Z", "../x", "a\n"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def survives(call: Callable[[], T], *errors: type[Exception]) -> T | None:
    """Run ``call``; the listed errors are verdicts, anything else propagates as a crash."""
    try:
        return call()
    except errors:
        return None


# ---- arbitrary bytes ----------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=2048))
def test_strict_json_raises_only_json_error(data: bytes) -> None:
    survives(lambda: loads_strict(data), JsonError)


@fuzz
@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_parse_envelope_raises_only_envelope_error(data: bytes) -> None:
    survives(lambda: parse_envelope(data), EnvelopeError)


@fuzz
@given(st.text(max_size=64))
def test_b64decode_raises_only_envelope_error(text: str) -> None:
    survives(lambda: b64decode(text), EnvelopeError)


@fuzz
@given(st.binary(max_size=2048))
def test_trust_functions_raise_only_rejected_error_on_arbitrary_bytes(data: bytes) -> None:
    head = verify_head(
        ROOT, RELEASE.head, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head
    survives(lambda: verify_initial_root(data, network="testnet"), RejectedError)
    survives(lambda: verify_next_root(ROOT, data, network="testnet"), RejectedError)
    survives(
        lambda: verify_head(
            ROOT, data, network="testnet", now=NOW, last_serial=0, last_digest=None
        ),
        RejectedError,
    )
    survives(
        lambda: verify_snapshot(ROOT, data, head=head, network="testnet", now=NOW), RejectedError
    )


@fuzz
@given(json_values)
def test_any_json_as_envelope_raises_only_rejected_error(value: Any) -> None:
    data = json.dumps(value).encode()
    survives(
        lambda: verify_head(
            ROOT, data, network="testnet", now=NOW, last_serial=0, last_digest=None
        ),
        RejectedError,
    )


# ---- mutated envelopes ----------------------------------------------------------------------


def mutate_bytes(data: bytes, source: st.DataObject) -> bytes:
    kind = source.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
    at = source.draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ source.draw(st.integers(1, 255))]) + data[at + 1 :]
    if kind == "delete":
        return data[:at] + data[at + source.draw(st.integers(1, 8)) :]
    if kind == "insert":
        return data[:at] + source.draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data[:at]


@fuzz
@given(st.data())
def test_a_mutated_head_is_rejected_or_carries_the_signed_payload(data: st.DataObject) -> None:
    mutated = mutate_bytes(RELEASE.head, data)
    verified = survives(
        lambda: verify_head(
            ROOT, mutated, network="testnet", now=NOW, last_serial=0, last_digest=None
        ),
        RejectedError,
    )
    if verified is not None:  # only an edit outside the signed bytes can pass
        assert verified.payload == payload_of(RELEASE.head)


@fuzz
@given(st.sampled_from(["payloadType", "payload", "signatures"]), json_values)
def test_an_envelope_field_replaced_by_any_json_is_rejected(field: str, value: Any) -> None:
    envelope = json.loads(RELEASE.snapshot)
    envelope[field] = value
    data = json.dumps(envelope).encode()
    head = verify_head(
        ROOT, RELEASE.head, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head
    result = survives(
        lambda: verify_snapshot(ROOT, data, head=head, network="testnet", now=NOW), RejectedError
    )
    assert result is None


@fuzz
@given(st.lists(st.fixed_dictionaries({"keyid": json_values, "sig": json_values}), max_size=5))
def test_junk_signatures_never_count(entries: list[dict[str, Any]]) -> None:
    envelope = json.loads(RELEASE.head)
    envelope["signatures"] = entries
    data = json.dumps(envelope).encode()
    assert (
        survives(
            lambda: verify_head(
                ROOT, data, network="testnet", now=NOW, last_serial=0, last_digest=None
            ),
            RejectedError,
        )
        is None
    )


# ---- mutated payloads, signed again -------------------------------------------------------


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def edited(document: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """``document`` with one value replaced, one key removed, or one unknown key added."""
    copy_ = copy.deepcopy(document)
    path = data.draw(st.sampled_from([p for p in paths(copy_) if p]))
    parent: Any = copy_
    for step in path[:-1]:
        parent = parent[step]
    kind = data.draw(st.sampled_from(["replace", "remove", "add"]))
    if kind == "replace":
        parent[path[-1]] = data.draw(json_values)
    elif kind == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(json_values)
    else:
        parent.append(data.draw(json_values))
    return copy_


def signed(payload_type: str, document: Any) -> bytes:
    # json.dumps writes NaN and Infinity for such floats: exactly what a sloppy signer sends.
    return NETWORK.sign(payload_type, json.dumps(document).encode(), ["k1"])


@fuzz
@given(st.data())
def test_a_resigned_head_with_any_edit_raises_only_rejected_error(data: st.DataObject) -> None:
    document = edited(HEAD_PAYLOAD, data)
    verified = survives(
        lambda: verify_head(
            ROOT,
            signed(HEAD_TYPE, document),
            network="testnet",
            now=NOW,
            last_serial=0,
            last_digest=None,
        ),
        RejectedError,
    )
    if verified is not None:
        assert type(verified.head.serial) is int
        assert verified.head.network == "testnet"


@fuzz
@given(st.data())
def test_a_resigned_snapshot_with_any_edit_raises_only_rejected_error(
    data: st.DataObject,
) -> None:
    document = edited(SNAPSHOT_PAYLOAD, data)
    envelope = signed(SNAPSHOT_TYPE, document)
    digest = "sha256:" + hashlib.sha256(payload_of(envelope)).hexdigest()
    # A head that agrees with the edited snapshot, so the edit reaches every later check.
    serial = document.get("serial")
    if type(serial) is not int or not 0 < serial <= 2**53:
        serial = 5
    head = verify_head(
        ROOT,
        NETWORK.sign(
            HEAD_TYPE,
            canonical({**HEAD_PAYLOAD, "config_digest": digest, "serial": serial}),
            ["k1"],
        ),
        network="testnet",
        now=NOW,
        last_serial=0,
        last_digest=None,
    ).head
    verified = survives(
        lambda: verify_snapshot(ROOT, envelope, head=head, network="testnet", now=NOW),
        RejectedError,
    )
    if verified is not None:
        assert verified.digest == digest
        assert all(type(m.files[0].size) is int for m in verified.snapshot.models)


@fuzz
@given(st.data())
def test_a_resigned_root_with_any_edit_raises_only_rejected_error(data: st.DataObject) -> None:
    document = edited(ROOT_PAYLOAD, data)
    envelope = NETWORK.sign(ROOT_TYPE, json.dumps(document).encode(), ["k1", "k2"])
    survives(lambda: verify_next_root(ROOT, envelope, network="testnet"), RejectedError)
    survives(lambda: verify_initial_root(envelope, network="testnet"), RejectedError)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":']))
def test_deeply_nested_payloads_raise_only_rejected_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    head = verify_head(
        ROOT, RELEASE.head, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head
    for place in ("tasks", "env", "unknown"):
        text = canonical(SNAPSHOT_PAYLOAD).decode()
        text = text.replace('"runtimes":', f'"{place}":{nested},"runtimes":', 1)
        envelope = NETWORK.sign(SNAPSHOT_TYPE, text.encode(), ["k1"])
        survives(
            partial(verify_snapshot, ROOT, envelope, head=head, network="testnet", now=NOW),
            RejectedError,
        )


# ---- round trips ----------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=300))
def test_b64decode_reads_every_accepted_encoding(data: bytes) -> None:
    for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
        assert b64decode(encoded.decode()) == data
        assert b64decode(encoded.decode().rstrip("=")) == data


safe_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@fuzz
@given(safe_json)
def test_strict_json_reads_what_json_writes(value: Any) -> None:
    assert loads_strict(json.dumps(value).encode()) == value
    assert loads_strict(json.dumps(value, ensure_ascii=False).encode()) == value
