"""Node reports made without the agent: for ``fleet`` tests and the fleet benchmark.

Signed with the test suite's own DSSE code (``tests.support.signing``), not the product's,
so a ``fleet`` that accepts them agrees with an independent writer of the format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from tests.support.signing import canonical, format_time, sign_envelope

__all__ = ["REPORT_TYPE", "node_key", "report_payload", "signed_report", "write_report"]

REPORT_TYPE = "application/vnd.resultity.report+json"


def node_key(number: int) -> SigningKey:
    """Node key ``number``: the same bytes in every run."""
    return SigningKey(hashlib.sha256(f"fleet node {number}".encode()).digest())


def report_payload(key: SigningKey, *, at: float, **fields: Any) -> dict[str, Any]:
    """A converged node's report; ``fields`` replace any of its values."""
    public = bytes(key.verify_key)
    digest = "sha256:" + "a" * 64
    payload: dict[str, Any] = {
        "node": hashlib.sha256(public).hexdigest(),
        "public": public.hex(),
        "network": "testnet",
        "at": format_time(at),
        "agent_version": "0.1.0",
        "head": {"serial": 7, "config_digest": digest},
        "applied": {"serial": 7, "config_digest": digest, "at": format_time(at - 60)},
        "converged": True,
        "hold": False,
        "quarantined": [],
        "waiting": [],
        "rollout": None,
        "last_error": None,
        "models": [],
        "containers": [],
        "gpus": {"source": "none", "devices": [], "vram_mib": None},
    }
    payload.update(fields)
    return payload


def signed_report(key: SigningKey, payload: dict[str, Any], *, kind: str = REPORT_TYPE) -> bytes:
    return sign_envelope(kind, canonical(payload), [key])


def write_report(folder: Path, key: SigningKey, data: bytes, *, name: str | None = None) -> Path:
    """Store ``data`` as a collector would: ``folder/nodes/<keyid>.json``."""
    keyid = hashlib.sha256(bytes(key.verify_key)).hexdigest()
    path = folder / "nodes" / (name or f"{keyid}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
