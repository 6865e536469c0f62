"""DSSE interoperability with securesystemslib's implementation (docs/contract.md §1).

Envelopes made by ``securesystemslib.dsse.Envelope`` with its Ed25519 ``CryptoSigner`` are
accepted by ours, and ours verify there. The keys are the same 32-byte seeds on both sides;
the key id on both sides is the contract's (sha256 of the raw public key).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from reconciler.core.envelope import (
    HEAD_TYPE,
    SNAPSHOT_TYPE,
    add_signature,
    pae,
    parse_envelope,
    seal,
    valid_keyids,
)
from reconciler.core.trust import verify_head, verify_initial_root
from reconciler.network.publish import publish_snapshot
from tests.support.signing import (
    RepositorySimulator,
    base_snapshot,
    canonical,
    keyid,
    named_key,
    replace_payload,
)

NOW = 1_750_000_000.0


def sslib_signer(name: str) -> CryptoSigner:
    """securesystemslib's signer for the test key ``name``, under the contract's key id."""
    private = Ed25519PrivateKey.from_private_bytes(bytes(named_key(name)))
    public = SSlibKey.from_crypto(private.public_key(), keyid=keyid(named_key(name)))
    return CryptoSigner(private, public)


def sslib_key(name: str) -> SSlibKey:
    return sslib_signer(name).public_key


def sslib_envelope(payload_type: str, payload: bytes, *names: str) -> bytes:
    envelope = SslibEnvelope(payload=payload, payload_type=payload_type, signatures={})
    for name in names:
        envelope.sign(sslib_signer(name))
    return json.dumps(envelope.to_dict()).encode("utf-8")


def sslib_verify(data: bytes, names: list[str], threshold: int) -> set[str]:
    envelope = SslibEnvelope.from_dict(json.loads(data))
    return set(envelope.verify([sslib_key(n) for n in names], threshold))


@pytest.mark.parametrize(
    ("payload_type", "payload"),
    [
        (HEAD_TYPE, b'{"serial":1}'),
        ("text/plain; charset=\u00e9", "\u00e9t\u00e9".encode()),
        (SNAPSHOT_TYPE, b""),
        ("application/octet-stream", bytes(range(256))),
    ],
)
def test_pre_authentication_encoding_agrees(payload_type: str, payload: bytes) -> None:
    theirs = SslibEnvelope(payload=payload, payload_type=payload_type, signatures={}).pae()
    assert pae(payload_type, payload) == theirs


def test_envelope_signed_by_securesystemslib_is_accepted() -> None:
    network = RepositorySimulator(now=NOW)
    root = verify_initial_root(network.roots[1], network="testnet").root
    head = canonical(network.head_payload(3, "sha256:" + "c" * 64))
    data = sslib_envelope(HEAD_TYPE, head, "k1")

    verified = verify_head(root, data, network="testnet", now=NOW, last_serial=0, last_digest=None)

    assert verified.head.serial == 3
    assert verified.signed_by == (network.keyid("k1"),)


def test_k_of_n_signatures_from_securesystemslib_meet_our_threshold() -> None:
    network = RepositorySimulator(now=NOW, root_keys=("k1", "k2", "k3"), threshold=2)
    root = verify_initial_root(network.roots[1], network="testnet").root
    head = canonical(network.head_payload(3, "sha256:" + "c" * 64))

    both = sslib_envelope(HEAD_TYPE, head, "k3", "k1")
    one = sslib_envelope(HEAD_TYPE, head, "k2")

    checked = verify_head(root, both, network="testnet", now=NOW, last_serial=0, last_digest=None)
    assert set(checked.signed_by) == {network.keyid("k1"), network.keyid("k3")}
    assert valid_keyids(parse_envelope(one), root.key_by_id()) == {network.keyid("k2")}


def test_our_sealed_envelope_verifies_in_securesystemslib() -> None:
    data = seal(HEAD_TYPE, b'{"b": 2, "a": 1}', [named_key("k1"), named_key("k2")])

    assert sslib_verify(data, ["k1", "k2"], 2) == {keyid(named_key("k1")), keyid(named_key("k2"))}


def test_signature_added_by_a_second_key_holder_verifies_in_securesystemslib() -> None:
    data = add_signature(seal(SNAPSHOT_TYPE, b"{}", [named_key("k1")]), named_key("k2"))

    assert sslib_verify(data, ["k1", "k2"], 2) == {keyid(named_key("k1")), keyid(named_key("k2"))}


def test_published_origin_documents_verify_in_securesystemslib(tmp_path: Path) -> None:
    snapshot = base_snapshot()
    published = publish_snapshot(
        tmp_path, snapshot, signers=[named_key("k1")], now=NOW, expires_in_s=3600
    )
    head = (tmp_path / "head.json").read_bytes()
    snap = (tmp_path / "snapshots" / f"{published.digest[7:]}.json").read_bytes()

    assert sslib_verify(head, ["k1"], 1) == {keyid(named_key("k1"))}
    assert sslib_verify(snap, ["k1"], 1) == {keyid(named_key("k1"))}


def test_securesystemslib_refuses_what_we_would_refuse() -> None:
    data = seal(HEAD_TYPE, b'{"serial":1}', [named_key("k1")])
    tampered = replace_payload(data, b'{"serial":2}')

    trusted = {keyid(named_key("k1")): bytes(named_key("k1").verify_key)}
    assert valid_keyids(parse_envelope(data), trusted) == {keyid(named_key("k1"))}
    assert valid_keyids(parse_envelope(tampered), trusted) == frozenset()
    assert sslib_verify(data, ["k1"], 1) == {keyid(named_key("k1"))}
    with pytest.raises(VerificationError):
        sslib_verify(tampered, ["k1"], 1)
