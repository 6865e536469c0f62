"""Signed apply receipts (docs/contract.md §4): one DSSE envelope line per apply attempt.

The payload is built purely from what the apply recorded; signing uses the node's own key,
so ``reconcile verify`` can tell a receipt this node wrote from one edited later. The line is
compact JSON with no newline inside, as a git note holds one receipt per line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.core.envelope import RECEIPT_TYPE, seal
from reconciler.disk.keys import read_private_key

__all__ = ["receipt_line"]


def receipt_line(payload: dict[str, Any], *, node_key: Path) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return seal(RECEIPT_TYPE, body, [read_private_key(node_key)]).decode("ascii").strip()
