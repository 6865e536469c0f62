"""atheris harness: arbitrary bytes into the envelope and payload parsers, bounded in time.

Run it on its own (libFuzzer flags pass through)::

    python -m tests.fuzz.harness -max_total_time=600 [CORPUS_DIR]

Each input is split by its first byte into one of four targets:

0. ``trust.verify_head`` on the bytes as an envelope, against a fixed trusted root;
1. ``trust.verify_snapshot`` on an envelope *signed by the trusted key* whose payload is the
   fuzzer's bytes, so the input gets past the signature check to strict JSON, the schema,
   the document types and the head/snapshot agreement;
2. the same for a head payload;
3. ``envelope.parse_envelope`` and ``documents.loads_strict`` directly.

The only exceptions allowed out are the project's own verdicts (``RejectedError``,
``EnvelopeError``, ``JsonError``); anything else is a crash, and libFuzzer stops, writes the
input to ``crash-*`` and exits non-zero. ``seed_corpus`` writes valid documents to start
from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["reconciler"]):
    from reconciler.core.documents import Head, JsonError, loads_strict
    from reconciler.core.envelope import EnvelopeError, parse_envelope
    from reconciler.core.errors import RejectedError
    from reconciler.core.trust import verify_head, verify_initial_root, verify_snapshot

from tests.support.signing import (
    HEAD_TYPE,
    SNAPSHOT_TYPE,
    RepositorySimulator,
    base_snapshot,
    canonical,
    payload_of,
)

NOW = 1_750_000_000.0
NETWORK = RepositorySimulator(now=NOW)
ROOT = verify_initial_root(NETWORK.roots[1], network="testnet").root
HEAD = Head(
    network="testnet",
    serial=1,
    config_digest="sha256:" + "0" * 64,
    issued_at=int(NOW),
    expires=int(NOW) + 86400,
)


def check(data: bytes) -> None:
    """One input; raises only if the code under test misbehaves."""
    if not data:
        return
    target, body = data[0] % 4, data[1:]
    try:
        if target == 0:
            verify_head(ROOT, body, network="testnet", now=NOW, last_serial=0, last_digest=None)
        elif target == 1:
            signed = NETWORK.sign(SNAPSHOT_TYPE, body, ["k1"])
            verify_snapshot(ROOT, signed, head=HEAD, network="testnet", now=NOW)
        elif target == 2:
            signed = NETWORK.sign(HEAD_TYPE, body, ["k1"])
            verify_head(ROOT, signed, network="testnet", now=NOW, last_serial=0, last_digest=None)
        else:
            try:
                parse_envelope(body)
            finally:
                loads_strict(body)
    except (RejectedError, EnvelopeError, JsonError):
        pass


def seed_corpus(folder: Path) -> None:
    """Valid documents of each kind, each behind the byte that selects its target."""
    folder.mkdir(parents=True, exist_ok=True)
    release = NETWORK.release(1, body=base_snapshot())
    seeds = {
        "head": b"\x00" + release.head,
        "snapshot-payload": b"\x01" + release.snapshot_payload,
        "head-payload": b"\x02" + payload_of(release.head),
        "envelope": b"\x03" + release.snapshot,
        "json": b"\x03" + canonical({"a": [1, 2.5, None, True, "x"]}),
    }
    for name, data in seeds.items():
        (folder / name).write_bytes(data)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, lambda data: check(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
