"""DSSE v1 envelopes with Ed25519 signatures (docs/contract.md §1): parse, verify, sign.

Pure: bytes in, bytes or typed values out; no I/O and no clock. PyNaCl's exceptions stay
inside this module. Verification never raises for a bad signature: a signature that does not
verify, names an unknown key, or is malformed is simply not counted (DSSE says so, and it lets
a key holder's broken signature not block the others).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from reconciler.core.documents import JsonError, loads_strict

__all__ = [
    "HEAD_TYPE",
    "RECEIPT_TYPE",
    "REPORT_TYPE",
    "ROOT_TYPE",
    "SNAPSHOT_TYPE",
    "Envelope",
    "EnvelopeError",
    "Signature",
    "add_signature",
    "b64decode",
    "keyid_of",
    "pae",
    "parse_envelope",
    "seal",
    "signing_key_from_seed",
    "valid_keyids",
]

ROOT_TYPE = "application/vnd.resultity.root+json"
HEAD_TYPE = "application/vnd.resultity.head+json"
SNAPSHOT_TYPE = "application/vnd.resultity.snapshot+json"
RECEIPT_TYPE = "application/vnd.resultity.receipt+json"
REPORT_TYPE = "application/vnd.resultity.report+json"

_SIGNATURE_BYTES = 64
_MAX_SIGNATURES = 64  # more than any root may list (32 keys); bounds the verify work


class EnvelopeError(ValueError):
    """The bytes are not a well-formed DSSE envelope."""


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the signature actually covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def keyid_of(public: bytes) -> str:
    """Lowercase hex SHA-256 of the 32 raw public-key bytes."""
    return hashlib.sha256(public).hexdigest()


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not; anything else (whitespace too) is refused."""
    if not text.isascii():
        raise EnvelopeError("base64 text is not ASCII")
    body = text.rstrip("=")
    padding = len(text) - len(body)
    # Python ignores '=' beyond a complete quantum ("YWJj===="); RFC 4648 does not allow it.
    if padding and (padding > 2 or len(text) % 4):
        raise EnvelopeError("bad base64 (wrong padding)")
    normalised = body.replace("-", "+").replace("_", "/")
    normalised += "=" * (-len(normalised) % 4)
    try:
        return base64.b64decode(normalised, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"bad base64 ({exc})") from exc


def parse_envelope(data: bytes) -> Envelope:
    """Parse envelope bytes; unknown envelope fields are ignored, as DSSE says."""
    try:
        obj = loads_strict(data)
    except JsonError as exc:
        raise EnvelopeError(f"envelope is {exc}") from exc
    if not isinstance(obj, dict):
        raise EnvelopeError("envelope is not a JSON object")
    payload_type = obj.get("payloadType")
    payload = obj.get("payload")
    signatures = obj.get("signatures")
    if not isinstance(payload_type, str) or not payload_type:
        raise EnvelopeError("envelope has no payloadType string")
    if not isinstance(payload, str):
        raise EnvelopeError("envelope has no payload string")
    if not isinstance(signatures, list):
        raise EnvelopeError("envelope has no signatures list")
    if len(signatures) > _MAX_SIGNATURES:
        raise EnvelopeError(f"envelope carries more than {_MAX_SIGNATURES} signatures")
    parsed: list[Signature] = []
    for entry in signatures:
        if not isinstance(entry, dict):
            raise EnvelopeError("a signature entry is not an object")
        keyid, sig = entry.get("keyid"), entry.get("sig")
        if not isinstance(sig, str):
            raise EnvelopeError("a signature entry has no sig string")
        if not isinstance(keyid, str):
            # keyid is required by the contract; without it the signature cannot count.
            continue
        try:
            raw = b64decode(sig)
        except EnvelopeError:
            continue  # a malformed signature is ignored, like one that does not verify
        parsed.append(Signature(keyid=keyid, sig=raw))
    return Envelope(payload_type=payload_type, payload=b64decode(payload), signatures=tuple(parsed))


def valid_keyids(envelope: Envelope, trusted: Mapping[str, bytes]) -> frozenset[str]:
    """The distinct trusted key ids whose signature verifies over PAE(type, payload)."""
    message = pae(envelope.payload_type, envelope.payload)
    good: set[str] = set()
    for signature in envelope.signatures:
        public = trusted.get(signature.keyid)
        if public is None or signature.keyid in good:
            continue
        if len(signature.sig) != _SIGNATURE_BYTES:
            continue
        try:
            VerifyKey(public).verify(message, signature.sig)
        except (CryptoError, ValueError, TypeError):
            continue
        good.add(signature.keyid)
    return frozenset(good)


def signing_key_from_seed(seed: bytes) -> SigningKey:
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return SigningKey(seed)


def _sign(key: SigningKey, payload_type: str, payload: bytes) -> dict[str, str]:
    public = bytes(key.verify_key)
    sig = key.sign(pae(payload_type, payload)).signature
    return {"keyid": keyid_of(public), "sig": base64.b64encode(sig).decode("ascii")}


def seal(payload_type: str, payload: bytes, keys: Iterable[SigningKey]) -> bytes:
    """A new envelope over ``payload`` signed by each key, as compact JSON bytes."""
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [_sign(key, payload_type, payload) for key in keys],
    }
    return (json.dumps(envelope, separators=(",", ":")) + "\n").encode("ascii")


def add_signature(data: bytes, key: SigningKey) -> bytes:
    """Add one key holder's signature to an existing envelope (k-of-n without a shared key).

    The payload is kept byte for byte; a signature by the same key is replaced, not doubled.
    """
    envelope = parse_envelope(data)
    mine = keyid_of(bytes(key.verify_key))
    kept = [
        {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
        for s in envelope.signatures
        if s.keyid != mine
    ]
    kept.append(_sign(key, envelope.payload_type, envelope.payload))
    out = {
        "payloadType": envelope.payload_type,
        "payload": base64.b64encode(envelope.payload).decode("ascii"),
        "signatures": kept,
    }
    return (json.dumps(out, separators=(",", ":")) + "\n").encode("ascii")
