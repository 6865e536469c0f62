"""DSSE v1 envelopes (docs/contract.md §1): encoding, parsing and counting valid signatures."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from reconciler.core.envelope import (
    HEAD_TYPE,
    SNAPSHOT_TYPE,
    EnvelopeError,
    add_signature,
    b64decode,
    keyid_of,
    pae,
    parse_envelope,
    seal,
    signing_key_from_seed,
    valid_keyids,
)
from tests.support.signing import (
    edit_envelope,
    keyid,
    named_key,
    sign_envelope,
    signature_entry,
)
from tests.support.signing import pae as reference_pae

K1, K2, K3 = named_key("k1"), named_key("k2"), named_key("k3")
TRUSTED = {keyid(k): bytes(k.verify_key) for k in (K1, K2)}
PAYLOAD = b'{"hello":"world"}'


def test_pae_matches_the_dsse_specification_example() -> None:
    # The worked example of the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t/\u00e9", "\u00e9".encode()) == b"DSSEv1 4 t/\xc3\xa9 2 \xc3\xa9"
    assert pae(HEAD_TYPE, b"") == reference_pae(HEAD_TYPE, b"")


def test_keyid_is_sha256_of_the_raw_public_key() -> None:
    raw = bytes(K1.verify_key)
    assert keyid_of(raw) == keyid(K1)
    assert len(keyid_of(raw)) == 64 and keyid_of(raw) == keyid_of(raw).lower()


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda data: base64.b64encode(data).rstrip(b"="),
        lambda data: base64.urlsafe_b64encode(data).rstrip(b"="),
    ],
)
def test_b64decode_accepts_standard_and_url_safe_padded_or_not(encode: Any) -> None:
    data = bytes(range(256)) + b"\xfb\xff\xfe"
    assert b64decode(encode(data).decode("ascii")) == data


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "ab c",
        "YWJj\n",
        " YWJj",
        "YW*j",
        "\u00e9\u00e9\u00e9\u00e9",
        "YWJj=====",
        "YWJj====",
        "YQ=",
        "==",
    ],
)
def test_b64decode_refuses_anything_else(text: str) -> None:
    with pytest.raises(EnvelopeError):
        b64decode(text)


def test_seal_writes_standard_padded_base64_and_verifies() -> None:
    data = seal(HEAD_TYPE, b"\xfb\xff", [K1])
    obj = json.loads(data)
    assert obj["payload"] == "+/8="
    envelope = parse_envelope(data)
    assert envelope.payload == b"\xfb\xff"
    assert valid_keyids(envelope, TRUSTED) == {keyid(K1)}


def test_parse_ignores_unknown_envelope_fields() -> None:
    data = edit_envelope(
        sign_envelope(HEAD_TYPE, PAYLOAD, [K1]),
        lambda e: e.update(extra={"x": 1}) or e["signatures"][0].update(cert="..."),
    )
    envelope = parse_envelope(data)
    assert envelope.payload == PAYLOAD
    assert valid_keyids(envelope, TRUSTED) == {keyid(K1)}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.pop("payloadType"), "no payloadType"),
        (lambda e: e.update(payloadType=""), "no payloadType"),
        (lambda e: e.update(payloadType=7), "no payloadType"),
        (lambda e: e.pop("payload"), "no payload string"),
        (lambda e: e.update(payload=None), "no payload string"),
        (lambda e: e.pop("signatures"), "no signatures list"),
        (lambda e: e.update(signatures={}), "no signatures list"),
        (lambda e: e.update(signatures=["x"]), "not an object"),
        (lambda e: e["signatures"][0].pop("sig"), "no sig string"),
        (lambda e: e.update(signatures=[{"keyid": "a", "sig": ""}] * 65), "more than 64"),
        (lambda e: e.update(payload="YWJj\n"), "bad base64"),
    ],
)
def test_parse_refuses_malformed_envelopes(edit: Any, message: str) -> None:
    data = edit_envelope(sign_envelope(HEAD_TYPE, PAYLOAD, [K1]), edit)
    with pytest.raises(EnvelopeError, match=message):
        parse_envelope(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'"x"', b"null", b'{"payloadType": "a", "payloadType": "b"}', b"\xff\xfe"],
)
def test_parse_refuses_non_envelopes(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(data)


def test_signature_without_keyid_or_with_broken_base64_does_not_count() -> None:
    good = signature_entry(K1, HEAD_TYPE, PAYLOAD)
    no_keyid = {"sig": signature_entry(K2, HEAD_TYPE, PAYLOAD)["sig"]}
    broken = {"keyid": keyid(K2), "sig": "%%%"}
    data = edit_envelope(
        sign_envelope(HEAD_TYPE, PAYLOAD, []),
        lambda e: e.update(signatures=[no_keyid, broken, good]),
    )
    assert valid_keyids(parse_envelope(data), TRUSTED) == {keyid(K1)}


def test_same_key_signing_twice_counts_once() -> None:
    data = sign_envelope(HEAD_TYPE, PAYLOAD, [K1, K1, K1])
    assert valid_keyids(parse_envelope(data), TRUSTED) == {keyid(K1)}


def test_unknown_key_and_untrusted_signatures_do_not_count() -> None:
    data = sign_envelope(HEAD_TYPE, PAYLOAD, [K3, K2])
    assert valid_keyids(parse_envelope(data), TRUSTED) == {keyid(K2)}
    assert valid_keyids(parse_envelope(data), {}) == frozenset()


def test_signature_labelled_with_another_trusted_keyid_does_not_count() -> None:
    impostor = signature_entry(K3, HEAD_TYPE, PAYLOAD, label=keyid(K1))
    data = edit_envelope(
        sign_envelope(HEAD_TYPE, PAYLOAD, []), lambda e: e.update(signatures=[impostor])
    )
    assert valid_keyids(parse_envelope(data), TRUSTED) == frozenset()


def test_signature_covers_the_payload_type() -> None:
    data = edit_envelope(
        sign_envelope(HEAD_TYPE, PAYLOAD, [K1]), lambda e: e.update(payloadType=SNAPSHOT_TYPE)
    )
    assert valid_keyids(parse_envelope(data), TRUSTED) == frozenset()


def test_signature_of_wrong_length_does_not_count() -> None:
    sig = base64.b64decode(signature_entry(K1, HEAD_TYPE, PAYLOAD)["sig"])
    for bad in (sig[:-1], sig + b"\x00", b""):
        obj = json.loads(sign_envelope(HEAD_TYPE, PAYLOAD, []))
        obj["signatures"] = [{"keyid": keyid(K1), "sig": base64.b64encode(bad).decode()}]
        data = json.dumps(obj).encode()
        assert valid_keyids(parse_envelope(data), TRUSTED) == frozenset()


def test_url_safe_unpadded_envelope_from_another_signer_verifies() -> None:
    sig = base64.b64decode(signature_entry(K1, HEAD_TYPE, PAYLOAD)["sig"])
    data = json.dumps(
        {
            "payloadType": HEAD_TYPE,
            "payload": base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("="),
            "signatures": [
                {"keyid": keyid(K1), "sig": base64.urlsafe_b64encode(sig).decode().rstrip("=")}
            ],
        }
    ).encode()
    envelope = parse_envelope(data)
    assert envelope.payload == PAYLOAD
    assert valid_keyids(envelope, TRUSTED) == {keyid(K1)}


def test_add_signature_keeps_payload_bytes_and_replaces_own_signature() -> None:
    payload = b'{"b": 1,  "a": 2}'  # not canonical: must survive byte for byte
    one = seal(HEAD_TYPE, payload, [K1])
    two = add_signature(one, K2)
    again = add_signature(two, K2)

    for data in (two, again):
        envelope = parse_envelope(data)
        assert envelope.payload == payload
        assert valid_keyids(envelope, TRUSTED) == {keyid(K1), keyid(K2)}
    assert len(json.loads(again)["signatures"]) == 2


def test_add_signature_refuses_a_non_envelope() -> None:
    with pytest.raises(EnvelopeError):
        add_signature(b"{}", K1)


def test_signing_key_from_seed_needs_32_bytes() -> None:
    assert bytes(signing_key_from_seed(bytes(K1))) == bytes(K1)
    with pytest.raises(ValueError, match="32 bytes"):
        signing_key_from_seed(b"\x00" * 31)
