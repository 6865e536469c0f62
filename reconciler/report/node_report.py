"""The node's report to the network (docs/contract.md §9): what it runs, signed by its key.

Where it sits: built at the end of each ``once`` and every ``ttl.heartbeat_s`` under
``watch`` (``agent.heartbeat``), then sent by ``report.sender``. It is made from what the
node recorded, like ``status`` (whose view it reuses, so that "converged" or "held" mean
the same in both): the record, the git history, ``model-states.json`` and the last receipt.
It never asks Podman, the origin or a mirror, so building it costs a few file reads and
cannot hang on them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from reconciler import __version__
from reconciler.core.documents import Snapshot, format_time
from reconciler.core.envelope import REPORT_TYPE, EnvelopeError, keyid_of, parse_envelope, seal
from reconciler.core.errors import HistoryError, ReconcilerError
from reconciler.core.nodereport import MAX_REPORT_BYTES, report_base, report_object
from reconciler.core.rollout import Position, RolloutWait
from reconciler.disk.keys import read_private_key
from reconciler.history.node import Node
from reconciler.report.host_view import host_view, report_gpus
from reconciler.report.status import status_report

__all__ = ["report_payload", "report_url", "sealed_report"]

# Ever shorter lists until the envelope fits in MAX_REPORT_BYTES (None: as recorded).
_LIST_CAPS = (None, 64, 8, 0)


def report_url(node: Node) -> str | None:
    """``<report URL>nodes/<keyid>.json``, or None when this node does not report."""
    base = report_base(
        setting=node.settings.report_url,
        announced=_announced_url(node),
        origin=node.settings.normalised_origin(),
    )
    public = _public_bytes(node)
    if base is None or public is None:
        return None
    return base + report_object(keyid_of(public))


def sealed_report(node: Node, *, now: float | None = None) -> bytes:
    """The report envelope signed by the node key, at most ``MAX_REPORT_BYTES``."""
    key = read_private_key(node.paths.node_key)
    payload = report_payload(node, now=now)
    body = b""
    for cap in _LIST_CAPS:
        body = seal(REPORT_TYPE, _encoded(_capped(payload, cap)), [key])
        if len(body) <= MAX_REPORT_BYTES:
            return body
    raise ReconcilerError(f"the report is {len(body)} bytes even with every list emptied")


def report_payload(node: Node, *, now: float | None = None) -> dict[str, Any]:
    """The §9 fields, from what the node recorded (no Podman, origin or mirror asked)."""
    now = time.time() if now is None else now
    status = status_report(node, now=now)
    public = _public_bytes(node)
    head, applied = status["head"], status["applied"]
    error = status["last_error"]
    return {
        "node": keyid_of(public) if public else None,
        "public": public.hex() if public else None,
        "network": node.network,
        "at": format_time(now),
        "agent_version": __version__,
        "head": {"serial": head["serial"], "config_digest": head["digest"]} if head else None,
        "applied": {
            "serial": applied["serial"],
            "config_digest": applied["digest"],
            "at": applied["at"],
        }
        if applied["digest"]
        else None,
        "converged": status["converged"],
        "hold": status["hold"]["active"],
        "quarantined": status["quarantined"],
        "waiting": [_waiting_entry(item, status) for item in status["waiting"]],
        "rollout": _rollout_view(node, now),
        "last_error": f"{error['kind']}: {error['message']}"[:1000] if error else None,
        "models": [{"id": m.get("id"), "state": m.get("state")} for m in status["models"]],
        "containers": _containers_seen(node, head["commit"] if head else None),
        "gpus": _gpus_view(node),
        **_vram_and_holds(node),
    }


def _waiting_entry(item: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A stored snapshot that is not HEAD, and why in one word."""
    head_serial = (status["head"] or {}).get("serial") or 0
    if item["digest"] in status["quarantined"]:
        why = "quarantined"
    elif status["hold"]["active"]:
        why = "hold"
    elif item["serial"] <= head_serial:
        why = "older"
    else:
        why = "pending"
    return {"serial": item["serial"], "config_digest": item["digest"], "why": why}


def _rollout_view(node: Node, now: float) -> dict[str, Any] | None:
    """``{position, percent_now, …}`` of this node in the rollout it waits for or last took.

    Waiting: the stored head's rollout says how far it has gone now. Taken: the position the
    node entered at; HEAD's rollout is not kept after entering, so ``percent_now`` is null.
    Neither (no rollout seen, or every snapshot taken at once): null.
    """
    wait = RolloutWait.from_record(node.state.rollout_wait)
    if wait is not None:
        view = wait.view(now)
        return {
            "position": wait.position.hundredths / 100,
            "percent_now": view["percent_now"],
            "config_digest": wait.digest,
            "in": view["in"],
            "wave": view["wave"],
            "enters_at": view["enters_at"],
        }
    entered = node.state.rollout_entered
    if not entered:
        return None
    return {
        "position": Position.parse(str(entered["position"])).hundredths / 100,
        "percent_now": None,
        "config_digest": entered.get("digest"),
        "in": True,
        "wave": entered.get("wave"),
        "entered_at": entered.get("at"),
    }


def _vram_and_holds(node: Node) -> dict[str, Any]:
    """Additions to §9 (collectors ignore fields they do not know): the subclouds the node's
    VRAM kept it out of, and the runtimes held back for a CDI device it lacks (§11)."""
    host = host_view(node)
    part = host["participation"] or {}
    return {
        "excluded_for_vram": list(part.get("excluded_for_vram", [])),
        "held": [{"runtime": h["runtime"], "device": h["device"]} for h in host["held"]],
    }


def _gpus_view(node: Node) -> dict[str, Any]:
    """As the last pass discovered them (docs/contract.md §11), with ``vram_mib`` applied."""
    return report_gpus(node)


def _containers_seen(node: Node, head_commit: str | None) -> list[dict[str, Any]]:
    """The containers the last receipt saw (HEAD's, else the applied commit's); Podman is not
    asked, so a report cannot hang on it. Empty when no receipt recorded any."""
    commits = [head_commit]
    if node.state.applied_digest:
        commits.append(node.history.snapshot_ref(node.state.applied_digest))
    for commit in commits:
        if commit is None:
            continue
        try:
            lines = node.history.notes(commit)
        except HistoryError:
            continue
        for line in reversed(lines):
            seen = _receipt_containers(line)
            if seen is not None:
                return seen
    return []


def _receipt_containers(line: str) -> list[dict[str, Any]] | None:
    try:
        payload = json.loads(parse_envelope(line.encode("utf-8")).payload)
    except (EnvelopeError, ValueError):
        return None
    seen = payload.get("containers") if isinstance(payload, dict) else None
    if not isinstance(seen, list):
        return None
    return [{"name": c.get("name"), "state": c.get("state")} for c in seen if isinstance(c, dict)]


def _announced_url(node: Node) -> str | None:
    """HEAD's snapshot's ``reports.url``, if it names one."""
    oid = node.history.head_oid()
    if oid is None:
        return None
    try:
        payload, _envelope = node.history.blobs(oid)
        return Snapshot.from_payload(json.loads(payload)).reports_url
    except (HistoryError, ValueError, KeyError, TypeError):
        return None


def _public_bytes(node: Node) -> bytes | None:
    try:
        public = bytes.fromhex(node.paths.node_pub.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    return public if len(public) == 32 else None


def _capped(payload: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """The payload with each list cut to ``cap`` items; marked ``truncated`` when cut."""
    if cap is None:
        return payload
    lists = ("quarantined", "waiting", "models", "containers")
    cut = {key: payload[key][:cap] for key in lists}
    return {**payload, **cut, "truncated": True}


def _encoded(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
