"""``publish --agent-wheel``: approve an agent release in a snapshot (docs/contract.md §10).

Edge module (files), on the network's side beside ``publish``. It reads a wheel of this
project, copies it into the origin folder as ``agent/<file name>`` (so that nodes can fetch
it from the origin itself, by a relative URL), and fills ``updates.agent`` with the wheel's
version (from its file name), sha256 digest, size and mirror URLs. It signs nothing:
``publish_snapshot`` does that with the filled document.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler.core.errors import SettingsError
from reconciler.disk.atomic import write_atomic

__all__ = ["with_agent_wheel"]

# A wheel's file name (PEP 427): distribution-version(-build)?-python-abi-platform.whl
_WHEEL_NAME = re.compile(
    r"(?P<dist>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-[^-]+){3,4}\.whl"
)


def with_agent_wheel(
    document: dict[str, Any], wheel: Path, *, origin: Path, urls: Sequence[str] = ()
) -> dict[str, Any]:
    """The snapshot with ``updates.agent`` approving ``wheel``; the wheel copied into the
    origin. ``urls`` are further mirrors, tried after the origin's copy."""
    match = _WHEEL_NAME.fullmatch(wheel.name)
    if match is None or match["dist"].lower() != "reconciler":
        raise SettingsError(f"{wheel}: not a wheel of reconciler (reconciler-VERSION-…whl)")
    try:
        data = wheel.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read {wheel}: {exc.strerror or exc}") from exc
    write_atomic(origin / "agent" / wheel.name, data)
    filled = copy.deepcopy(document)
    updates = filled.setdefault("updates", {})
    if not isinstance(updates, dict):
        raise SettingsError("the snapshot's updates is not an object")
    previous = updates.get("agent")
    if not isinstance(previous, dict):
        previous = {}
    updates["agent"] = {
        **{k: v for k, v in previous.items() if k == "requires"},
        "version": match["version"],
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "urls": [f"agent/{wheel.name}", *urls],
    }
    return filled
