"""``publish --bt``: what the snapshot carries so that nodes can share a model file over
BitTorrent (docs/contract.md §12): the file's v1 piece length and piece hashes.

Where it sits: the network's side, before signing. ``publish_snapshot`` signs the result like
any snapshot, so the piece hashes are covered by the network's signatures and a node needs
nothing from a peer or a tracker to check each piece it receives. The torrent itself is never
written anywhere: a node rebuilds the same single-file info dictionary (name = the hex of the
file's sha256) from these fields, so every node of the network computes the same info-hash.

Why v1 and not v2: a v2 torrent's info dictionary holds only a Merkle root per file, and the
leaf hashes a node needs to check a piece come from peers (BEP 52 hash requests); a node that
has only web seeds (BEP 19) has nobody to ask. v1 pieces are self-contained. SHA-1's known
weakness is collisions, which only the publisher could exploit; a peer would need a second
preimage of a given piece. The node also checks the whole file's sha256 before installing it.

What it may not do: need libtorrent (publishers may not have it), read outside the folder it
is given, or vouch for bytes that do not match the file's declared digest.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.network.publish import fill_model_files, piece_digests

__all__ = ["MIN_TORRENT_BYTES", "TorrentsFilled", "piece_length_for", "with_torrents"]

# Smaller files are fetched over HTTP: a swarm costs a torrent, a listening socket and a few
# round trips before its first byte, which a file of a few MiB does not earn back.
MIN_TORRENT_BYTES = 4 * 1024 * 1024
_MIN_PIECE = 256 * 1024
_MAX_PIECE = 16 * 1024 * 1024
_TARGET_PIECES = 1024


@dataclass(frozen=True)
class TorrentsFilled:
    """What ``with_torrents`` did, as ``ChunksFilled`` counts it."""

    filled: int
    not_found: int
    skipped: int


def piece_length_for(size: int) -> int:
    """A power of two from 256 KiB to 16 MiB giving about 1,024 pieces: few enough that the
    snapshot stays small (20 bytes a piece), many enough to spread a file over a swarm."""
    length = _MIN_PIECE
    while length < _MAX_PIECE and -(-size // length) > _TARGET_PIECES:
        length *= 2
    return length


def with_torrents(snapshot: dict[str, Any], folder: Path) -> tuple[dict[str, Any], TorrentsFilled]:
    """A copy of ``snapshot`` whose model files found in ``folder`` (looked for as
    ``with_chunks`` does) and larger than ``MIN_TORRENT_BYTES`` carry ``bt``. A file whose
    bytes do not match its declared digest is refused."""

    def bt(source: Path, entry: dict[str, Any]) -> dict[str, Any]:
        length = piece_length_for(int(entry["size"]))
        hashes = piece_digests(source, entry, length, new=_sha1, what="piece hashes")
        return {"piece_length": length, "pieces": base64.b64encode(b"".join(hashes)).decode()}

    document = copy.deepcopy(snapshot)
    counts = fill_model_files(document, folder, field="bt", above=MIN_TORRENT_BYTES, make=bt)
    return document, TorrentsFilled(*counts)


def _sha1() -> Any:
    # v1 piece hashes are SHA-1 by the BitTorrent spec, not a security choice of ours.
    return hashlib.sha1(usedforsecurity=False)
