"""A signing network in a box: keys, roots, heads and snapshots made on demand for tests.

``RepositorySimulator`` plays the network's side. It owns named Ed25519 keys (derived from
their names, so a run is reproducible), the chain of roots it has made, and the serial it last
published. Every document can be bent before it is signed: a test passes ``mutate_*`` (change
the payload dict), ``*_bytes`` (change the encoded payload) or edits the finished envelope
with ``replace_payload`` / ``edit_envelope``, and so makes exactly the defect it wants to see
rejected. With a ``folder`` it writes what it publishes the way an origin lays it out
(``root/N.json``, ``head.json``, ``snapshots/<hex>.json``), ready for a ``file_server`` or a
``file://`` origin.

The DSSE encoding here is written out independently of ``reconciler.envelope`` on purpose:
a mistake in the product's PAE or base64 must not be mirrored by the tests that check it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

__all__ = [
    "HEAD_TYPE",
    "ROOT_TYPE",
    "SNAPSHOT_TYPE",
    "Release",
    "RepositorySimulator",
    "base_snapshot",
    "canonical",
    "digest_hex",
    "edit_envelope",
    "format_time",
    "keyid",
    "named_key",
    "pae",
    "payload_of",
    "replace_payload",
    "sign_envelope",
    "signature_entry",
]

ROOT_TYPE = "application/vnd.resultity.root+json"
HEAD_TYPE = "application/vnd.resultity.head+json"
SNAPSHOT_TYPE = "application/vnd.resultity.snapshot+json"

DAY = 86400  # seconds
ZERO_DIGEST = "sha256:" + "0" * 64

PayloadEdit = Callable[[dict[str, Any]], None]
BytesEdit = Callable[[bytes], bytes]


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def digest_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding, spelled out from the DSSE specification."""
    kind = payload_type.encode("utf-8")
    return b" ".join(
        [b"DSSEv1", str(len(kind)).encode(), kind, str(len(payload)).encode(), payload]
    )


def named_key(name: str) -> SigningKey:
    """The key called ``name``: the same bytes in every run."""
    return SigningKey(hashlib.sha256(f"reconciler test key {name}".encode()).digest())


def keyid(key: SigningKey) -> str:
    return hashlib.sha256(bytes(key.verify_key)).hexdigest()


def signature_entry(
    key: SigningKey, payload_type: str, payload: bytes, *, label: str | None = None
) -> dict[str, str]:
    """One ``{keyid, sig}``; ``label`` claims another key id than the signer's."""
    sig = key.sign(pae(payload_type, payload)).signature
    return {"keyid": label or keyid(key), "sig": base64.b64encode(sig).decode("ascii")}


def sign_envelope(payload_type: str, payload: bytes, keys: Iterable[SigningKey]) -> bytes:
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [signature_entry(key, payload_type, payload) for key in keys],
    }
    return json.dumps(envelope).encode("ascii")


def edit_envelope(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Change the envelope object itself (signatures, fields, encodings) and re-encode it."""
    envelope = json.loads(data)
    edit(envelope)
    return json.dumps(envelope).encode("utf-8")


def replace_payload(data: bytes, payload: bytes) -> bytes:
    """The same signatures over other payload bytes: what a tampering mirror would serve."""

    def swap(envelope: dict[str, Any]) -> None:
        envelope["payload"] = base64.b64encode(payload).decode("ascii")

    return edit_envelope(data, swap)


def payload_of(data: bytes) -> bytes:
    return base64.b64decode(json.loads(data)["payload"])


def base_snapshot(network: str = "testnet") -> dict[str, Any]:
    """A small valid snapshot body (without serial and times, which the simulator adds)."""
    return {
        "network": network,
        "models": [
            {
                "name": "tiny-llm",
                "version": "v1",
                "files": [
                    {
                        "path": "config.json",
                        "size": 3,
                        "digest": "sha256:" + digest_hex(b"abc"),
                        "urls": ["models/tiny-llm/config.json"],
                    }
                ],
                "tasks": ["chat"],
            }
        ],
        "runtimes": [],
        "jobs": {"max_tokens": 4096, "max_queue": 16, "timeout_s": 120},
        "participation": {
            "modes": [network],
            "subclouds": [{"id": "eu-small", "enabled": True}],
        },
        "ttl": {
            "poll_s": 60,
            "heartbeat_s": 30,
            "retry_min_s": 5,
            "retry_max_s": 300,
            "cache_s": 86400,
        },
        "updates": {
            "agent": {"version": "0.1.0", "digest": ZERO_DIGEST},
            "runtime": {"version": "1.0.0", "digest": ZERO_DIGEST},
        },
    }


@dataclass(frozen=True)
class Release:
    """One published snapshot: its envelopes as served and what names it."""

    serial: int
    digest: str  # "sha256:<hex>" of the snapshot payload
    head: bytes
    snapshot: bytes
    snapshot_payload: bytes

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @property
    def snapshot_path(self) -> str:
        return f"snapshots/{self.hex}.json"


class RepositorySimulator:
    """The network: root 1 is made at construction (key ``k1``, threshold 1)."""

    def __init__(
        self,
        folder: Path | None = None,
        *,
        network: str = "testnet",
        now: float | None = None,
        root_keys: Sequence[str] = ("k1",),
        threshold: int = 1,
    ) -> None:
        self.folder = folder
        self.network = network
        self.now = time.time() if now is None else now
        self.serial = 0
        self.roots: dict[int, bytes] = {}
        self.members: dict[int, tuple[tuple[str, ...], int]] = {}
        self.make_root(1, keys=root_keys, threshold=threshold)

    # ---- keys and roots ------------------------------------------------------------------

    def key(self, name: str) -> SigningKey:
        return named_key(name)

    def keyid(self, name: str) -> str:
        return keyid(self.key(name))

    @property
    def root_version(self) -> int:
        return max(self.roots)

    @property
    def signers(self) -> tuple[str, ...]:
        """The names that sign by default: every key of the newest root."""
        return self.members[self.root_version][0]

    def root_payload(
        self,
        version: int,
        *,
        keys: Sequence[str],
        threshold: int = 1,
        expires_in: float = 365 * DAY,
        network: str | None = None,
    ) -> dict[str, Any]:
        return {
            "version": version,
            "network": network or self.network,
            "threshold": threshold,
            "keys": [
                {"keyid": self.keyid(n), "public": bytes(self.key(n).verify_key).hex()}
                for n in keys
            ],
            "expires": format_time(self.now + expires_in),
        }

    def make_root(
        self,
        version: int,
        *,
        keys: Sequence[str],
        threshold: int = 1,
        signers: Sequence[str] | None = None,
        expires_in: float = 365 * DAY,
        network: str | None = None,
        mutate: PayloadEdit | None = None,
        write: bool = True,
    ) -> bytes:
        """Root ``version`` listing ``keys``; signed by ``signers`` (default: ``keys``).

        To rotate, sign with the previous root's keys too: ``signers=["k1", "k2"]``.
        Version 2 and later are written to ``root/N.json`` when the simulator has a folder.
        """
        payload = self.root_payload(
            version, keys=keys, threshold=threshold, expires_in=expires_in, network=network
        )
        if mutate is not None:
            mutate(payload)
        envelope = sign_envelope(
            ROOT_TYPE, canonical(payload), [self.key(n) for n in (signers or keys)]
        )
        self.roots[version] = envelope
        self.members[version] = (tuple(keys), threshold)
        if write and version > 1 and self.folder is not None:
            self.write(f"root/{version}.json", envelope)
        return envelope

    # ---- heads and snapshots -------------------------------------------------------------

    def snapshot_payload(
        self,
        serial: int,
        *,
        expires_in: float = DAY,
        network: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload = copy.deepcopy(body) if body is not None else base_snapshot(self.network)
        payload.setdefault("network", network or self.network)
        if network is not None:
            payload["network"] = network
        payload["serial"] = serial
        payload["issued_at"] = format_time(self.now)
        payload["expires"] = format_time(self.now + expires_in)
        return payload

    def head_payload(
        self, serial: int, digest: str, *, expires_in: float = DAY, network: str | None = None
    ) -> dict[str, Any]:
        return {
            "network": network or self.network,
            "serial": serial,
            "config_digest": digest,
            "issued_at": format_time(self.now),
            "expires": format_time(self.now + expires_in),
        }

    def sign(self, payload_type: str, payload: bytes, signers: Sequence[str]) -> bytes:
        return sign_envelope(payload_type, payload, [self.key(n) for n in signers])

    def release(
        self,
        serial: int | None = None,
        *,
        body: dict[str, Any] | None = None,
        signers: Sequence[str] | None = None,
        head_signers: Sequence[str] | None = None,
        snapshot_signers: Sequence[str] | None = None,
        mutate_snapshot: PayloadEdit | None = None,
        mutate_head: PayloadEdit | None = None,
        snapshot_bytes: BytesEdit | None = None,
        head_bytes: BytesEdit | None = None,
        snapshot_expires_in: float = DAY,
        head_expires_in: float = DAY,
        head_serial: int | None = None,
        head_digest: str | None = None,
    ) -> Release:
        """Sign a snapshot and a head naming it, without writing anything.

        ``serial`` defaults to the last one + 1. ``head_serial`` / ``head_digest`` make the head
        disagree with its snapshot; ``mutate_*`` edit a payload dict and ``*_bytes`` its encoded
        bytes before signing.
        """
        serial = self.serial + 1 if serial is None else serial
        payload = self.snapshot_payload(serial, expires_in=snapshot_expires_in, body=body)
        if mutate_snapshot is not None:
            mutate_snapshot(payload)
        snap = canonical(payload)
        if snapshot_bytes is not None:
            snap = snapshot_bytes(snap)
        digest = "sha256:" + digest_hex(snap)
        head_obj = self.head_payload(
            serial if head_serial is None else head_serial,
            head_digest or digest,
            expires_in=head_expires_in,
        )
        if mutate_head is not None:
            mutate_head(head_obj)
        head = canonical(head_obj)
        if head_bytes is not None:
            head = head_bytes(head)
        default = signers or self.signers
        return Release(
            serial=serial,
            digest=head_digest or digest,
            head=self.sign(HEAD_TYPE, head, head_signers or default),
            snapshot=self.sign(SNAPSHOT_TYPE, snap, snapshot_signers or default),
            snapshot_payload=snap,
        )

    def publish(self, serial: int | None = None, **options: Any) -> Release:
        """``release`` and write it into the folder: snapshot first, head last."""
        release = self.release(serial, **options)
        self.serve(release)
        return release

    def serve(self, release: Release, *, snapshot: bool = True, head: bool = True) -> None:
        self.serial = max(self.serial, release.serial)
        if snapshot:
            self.write(release.snapshot_path, release.snapshot)
        if head:
            self.write("head.json", release.head)

    def write(self, path: str, data: bytes) -> Path:
        """Put ``data`` at ``path`` in the origin folder, atomically (a server may be reading)."""
        if self.folder is None:
            raise RuntimeError("this simulator has no origin folder")
        target = self.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f".{target.name}.tmp")
        scratch.write_bytes(data)
        scratch.replace(target)
        return target
