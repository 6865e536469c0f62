"""What ``reconcile status`` and ``reconcile log`` show, built from what was recorded.

Reads the node record, the git history and small files; it never asks Podman, the origin or
a mirror (status must answer instantly, also when those are down). The JSON shape is part of
the operator interface and documented field by field in docs/status.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

from reconciler import __version__
from reconciler.core.agentrelease import runtime_update_check
from reconciler.core.documents import parse_time
from reconciler.core.errors import HistoryError
from reconciler.core.record import NodeState
from reconciler.core.rollout import RolloutWait
from reconciler.history.node import Node
from reconciler.report.deliveries import read_deliveries
from reconciler.report.host_view import format_host_lines, host_view
from reconciler.selfupdate.view import agent_release_line, agent_releases_view

__all__ = ["format_log", "format_status", "status_report"]


def _commit_view(node: Node, oid: str | None) -> dict[str, Any] | None:
    if oid is None:
        return None
    try:
        info = node.history.info(oid)
    except HistoryError:
        return {"commit": oid, "digest": None, "serial": None, "reason": None}
    return {"commit": oid, "digest": info.digest, "serial": info.serial, "reason": info.reason}


def _models_view(node: Node) -> list[dict[str, Any]]:
    path = node.paths.state_dir / "model-states.json"
    try:
        recorded = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return []
    return list(recorded.get("models", []))


def status_report(node: Node, *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    state = node.state
    head_oid = node.history.head_oid()
    head = _commit_view(node, head_oid)
    return {
        "network": node.network,
        "origin": node.settings.normalised_origin(),
        "state_dir": str(node.paths.state_dir),
        "head": head,
        "applied": {
            "digest": state.applied_digest,
            "serial": state.applied_serial,
            "at": state.applied_at,
        },
        "converged": bool(
            state.converged and head is not None and state.applied_digest == head["digest"]
        ),
        "hold": _hold_view(state, head_oid),
        "waiting": _waiting_view(node, head, now=now),
        "rollout_entered": state.rollout_entered,
        "quarantined": list(state.quarantined),
        "stale": _stale_view(state, now),
        "last_accepted": {
            "serial": state.last_serial,
            "digest": state.last_digest,
            "head_expires": state.last_head_expires,
        },
        "last_fetch_ok_at": state.last_fetch_ok_at,
        "last_error": _error_view(state.last_error),
        "last_rejection": _error_view(state.last_rejection),
        **_refused_view(state),  # refused_hooks, metrics_refused (docs/security.md)
        "models": _models_view(node),
        "node_public_key": _public_key(node),
        "agent": _agent_view(node, head_oid if head and head["digest"] else None),
        "counters": dict(state.counters),
        "report": _report_view(node),
        **host_view(node),  # gpus, cdi, held, participation (docs/contract.md §11)
        "p2p": _p2p_view(node),
    }


def _p2p_view(node: Node) -> dict[str, Any] | None:
    """What the node's swarm last recorded (docs/contract.md §12); None when p2p is off."""
    if not node.settings.p2p:
        return None
    from reconciler.models.swarm import read_swarm_status

    return read_swarm_status(node.paths.models) or {"state": "not started"}


def _p2p_line(view: dict[str, Any]) -> str:
    fallback = view.get("fallback")
    state = view.get("state")
    if state == "not started":
        return "p2p         on, not started yet (the next download or `watch` starts it)"
    if state not in ("on", "stopped"):
        reason = f": {fallback['reason']} ({fallback['at']})" if fallback else ""
        return f"p2p         {state}, files come over HTTP{reason}"
    if state == "stopped":
        return (
            f"p2p         stopped at {view.get('updated_at')} (starts with the next download "
            f"or `watch`), {view.get('uploaded_bytes', 0)} B up, "
            f"{view.get('downloaded_bytes', 0)} B down"
        )
    seeding = view.get("seeding")
    offered = "seeding off" if seeding is None else f"seeding {seeding} blob(s)"
    line = (
        f"p2p         on {view.get('listen')}, {offered}, {view.get('uploaded_bytes', 0)} B up, "
        f"{view.get('downloaded_bytes', 0)} B down, {view.get('hash_failures', 0)} bad "
        f"piece(s), {view.get('banned_peers', 0)} peer(s) banned"
    )
    if fallback:
        line += f"; last fallback to HTTP: {fallback['reason']} ({fallback['at']})"
    return line


def _hold_view(state: NodeState, head_oid: str | None) -> dict[str, Any]:
    """Held by the record, or because HEAD is not where the agent last put it (git by hand)."""
    expected = state.expected_head
    moved = bool(head_oid and expected and head_oid != expected)
    return {
        "active": state.hold or moved,
        "reason": state.hold_reason
        or (f"HEAD moved with git to {head_oid[:12]}" if moved and head_oid else None),
    }


def _waiting_view(node: Node, head: dict[str, Any] | None, *, now: float) -> list[dict[str, Any]]:
    """The stored snapshots not yet at HEAD (newer ones, or others held back); the one the
    newest head's rollout keeps out also says where this node stands in it."""
    head_serial = head["serial"] if head and head["serial"] else 0
    wait = RolloutWait.from_record(node.state.rollout_wait)
    waiting = []
    for digest in node.state.waiting:
        oid = node.history.snapshot_ref(digest)
        if oid is None:
            continue
        info = node.history.info(oid)
        if info.serial > head_serial or digest != (head or {}).get("digest"):
            item: dict[str, Any] = {"digest": digest, "serial": info.serial}
            if wait is not None and wait.digest == digest:
                item["rollout"] = wait.view(now)
            waiting.append(item)
    return waiting


def _report_view(node: Node) -> dict[str, Any] | None:
    """The last report sent to the collector (docs/contract.md §9); None before the first."""
    last = read_deliveries(node.paths.state_dir).last
    if last is None:
        return None
    return {
        "at": last.at,
        "url": last.url,
        "ok": last.ok,
        "status": last.status,
        "result": last.message,
    }


def _stale_view(state: NodeState, now: float) -> dict[str, Any]:
    since = state.last_head_expires
    stale = bool(since and parse_time(since) <= now)
    return {"stale": stale, "since": since if stale else None}


def _public_key(node: Node) -> str | None:
    try:
        return node.paths.node_pub.read_text(encoding="ascii").strip()
    except OSError:
        return None


def _agent_view(node: Node, head_oid: str | None) -> dict[str, Any]:
    """The running agent against the version HEAD's snapshot approves (``updates.agent``)."""
    approved = _approved_agent(node, head_oid)
    return {
        "running": __version__,
        "approved": approved,
        "update_available": bool(approved and approved != __version__),
        # The last run of the agent-update hook: {version, digest, exit_code, at} or None.
        "update_hook": node.state.agent_update,
        **agent_releases_view(node.paths.state_dir, self_update=node.settings.self_update),
        "runtime_update": _runtime_update(node, head_oid),
    }


def _head_payload(node: Node, oid: str | None) -> dict[str, Any]:
    if oid is None:
        return {}
    try:
        payload, _envelope = node.history.blobs(oid)
        obj = json.loads(payload)
    except (HistoryError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _approved_agent(node: Node, oid: str | None) -> str | None:
    try:
        version = _head_payload(node, oid).get("updates", {}).get("agent", {}).get("version")
    except AttributeError:
        return None
    return version if isinstance(version, str) else None


def _runtime_update(node: Node, oid: str | None) -> dict[str, Any] | None:
    """HEAD's ``updates.runtime`` against the images its runtimes pin (docs/contract.md §10)."""
    payload = _head_payload(node, oid)
    try:
        images = {str(r["name"]): str(r["image"]) for r in payload.get("runtimes", [])}
        return runtime_update_check(payload["updates"], images)
    except (KeyError, TypeError, AttributeError):
        return None


_HOOK_ORDER = ("pre-apply", "post-apply", "agent-update")  # docs/contract.md §7


def _refused_view(state: NodeState) -> dict[str, Any]:
    """What strict modes refuse now: the hooks not run, the metrics file not written."""
    refused = state.refused
    hooks = [
        {"hook": name, "reason": refused[name]["reason"], "at": refused[name]["at"]}
        for name in _HOOK_ORDER
        if name in refused
    ]
    metrics = refused.get("metrics")
    return {
        "refused_hooks": hooks,
        "metrics_refused": dict(metrics) if metrics is not None else None,
    }


def _error_view(error: Any) -> dict[str, str] | None:
    if error is None:
        return None
    return {"at": error.at, "kind": error.kind, "message": error.message}


def _refused_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"refused     {hook['hook']} not run: {hook['reason']} (since {hook['at']})"
        for hook in report.get("refused_hooks", [])
    ]
    if report.get("metrics_refused"):
        m = report["metrics_refused"]
        lines.append(f"refused     metrics file not written: {m['reason']} (since {m['at']})")
    return lines


def format_status(report: dict[str, Any]) -> str:
    head = report["head"]
    applied = report["applied"]
    lines = [f"network     {report['network']}   origin {report['origin'] or '(none)'}"]
    if head:
        lines.append(f"HEAD        serial {head['serial']}  {head['digest']}  ({head['reason']})")
    else:
        lines.append("HEAD        (no snapshot yet)")
    if applied["digest"]:
        lines.append(
            f"applied     serial {applied['serial']}  {applied['digest']}  at {applied['at']}"
        )
    else:
        lines.append("applied     (nothing applied yet)")
    lines.append(f"converged   {'yes' if report['converged'] else 'no'}")
    if report["hold"]["active"]:
        lines.append(
            f"hold        {report['hold']['reason'] or 'active'} (lift with `reconcile resume`)"
        )
    for item in report["waiting"]:
        rollout = f" — {item['rollout']['summary']}" if item.get("rollout") else ""
        lines.append(f"waiting     serial {item['serial']}  {item['digest']}{rollout}")
    for digest in report["quarantined"]:
        lines.append(f"quarantined {digest}")
    if report["stale"]["stale"]:
        lines.append(f"stale       since {report['stale']['since']} (no newer head could be had)")
    lines.append(f"last fetch  {report['last_fetch_ok_at'] or 'never succeeded'}")
    if report["report"]:
        sent = report["report"]
        lines.append(
            f"last report {sent['at']}  {'sent' if sent['ok'] else 'FAILED'}: {sent['result']}"
        )
    if report["last_rejection"]:
        r = report["last_rejection"]
        lines.append(f"rejected    {r['message']} ({r['at']})")
    if report["last_error"] and report["last_error"] != report["last_rejection"]:
        e = report["last_error"]
        lines.append(f"last error  {e['message']} ({e['kind']}, {e['at']})")
    lines += _refused_lines(report)
    if report.get("p2p"):
        lines.append(_p2p_line(report["p2p"]))
    for model in report["models"]:
        reason = f"  {model['reason']}" if model.get("reason") else ""
        lines.append(f"model       {model['id']:<40} {model['state']}{reason}")
    lines += format_host_lines(report)
    agent = report["agent"]
    if agent["update_available"]:
        ran = agent.get("update_hook")
        hook = (
            f" (agent-update exited {ran['exit_code']} at {ran['at']})"
            if ran and ran.get("version") == agent["approved"]
            else ""
        )
        lines.append(f"agent       {agent['running']} running, {agent['approved']} approved{hook}")
    if agent["selected"] or agent["previous"] or agent["failed"]:
        lines.append(f"agent       {agent_release_line(agent)}")
    if agent["runtime_update"] and agent["runtime_update"]["warning"]:
        lines.append(f"warning     {agent['runtime_update']['warning']}")
    return "\n".join(lines)


def format_log(node: Node, *, limit: int | None = None, receipts: bool = False) -> str:
    """One line per commit of HEAD's history; with ``receipts``, each apply attempt under it."""
    lines = []
    for info in node.history.log(limit=limit):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.time))
        payloads = _receipt_payloads(node, info.oid)
        results = [str(p.get("result", "?")) if p else "unreadable" for p in payloads]
        outcome = f"  applied: {', '.join(results)}" if results else ""
        wave = (
            f"  wave {info.admission.wave} at {info.admission.position} %"
            if info.admission is not None
            else ""
        )
        lines.append(
            f"{info.oid[:10]}  {when}Z  serial {info.serial:<6} {info.digest[:19]}…  "
            f"{info.reason:<8} signed by {len(info.signed_by)}{wave}{outcome}"
        )
        if receipts:
            for number, payload in enumerate(payloads, start=1):
                lines.extend(_receipt_summary(number, payload))
    return "\n".join(lines) if lines else "(no snapshots yet)"


def _receipt_payloads(node: Node, oid: str) -> list[dict[str, Any] | None]:
    """Each receipt on a commit, decoded (None if unreadable). Signatures are not checked
    here: ``reconcile verify`` does that."""
    from reconciler.core.envelope import EnvelopeError, parse_envelope

    payloads: list[dict[str, Any] | None] = []
    for line in node.history.notes(oid):
        try:
            payload = json.loads(parse_envelope(line.encode("utf-8")).payload)
        except (EnvelopeError, ValueError):
            payload = None
        payloads.append(payload if isinstance(payload, dict) else None)
    return payloads


def _receipt_summary(number: int, payload: dict[str, Any] | None) -> list[str]:
    """A receipt in a few indented lines, as an operator reads it in ``reconcile log``."""
    if payload is None:
        return [f"    receipt {number}: unreadable"]
    actions = payload.get("actions") or []
    failed = sum(1 for a in actions if not a.get("ok"))
    hooks = [
        f"{h.get('name')} {'timed out' if h.get('timed_out') else h.get('exit_code')}"
        for h in payload.get("hooks") or []
        if h.get("ran")
    ]
    lines = [
        f"    receipt {number}: {payload.get('result', '?')}  "
        f"{payload.get('started_at', '?')} → {payload.get('finished_at', '?')}  "
        f"reason {payload.get('reason', '?')}  "
        f"{len(actions)} action(s){f', {failed} failed' if failed else ''}"
        + (f"  hooks: {', '.join(hooks)}" if hooks else "")
    ]
    for action in actions:
        what = action.get("action") or {}
        container = (action.get("container_id") or "")[:12]
        lines.append(
            f"      {'ok  ' if action.get('ok') else 'FAIL'} {what.get('kind', '?')} "
            f"{what.get('container', '?')}{f' ({container})' if container else ''}: "
            f"{action.get('message', '')}"
        )
    if payload.get("error"):
        lines.append(f"      error: {payload['error']}")
    return lines
