"""``reconcile verify``: re-check what is on disk against what was signed.

Edge module (reads git, files). Every commit reachable from HEAD, ``main`` and the snapshot refs
is re-verified against the root that accepted it (``Root-Version``), ignoring expiry and
serial (docs/contract.md §3); every receipt against ``node.pub``; the hash of every model blob and
installed model file (via the model store). It reports each problem; it repairs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from reconciler.core.errors import HistoryError, RejectedError
from reconciler.history.node import Node

__all__ = [
    "Finding",
    "VerifyReport",
    "verify_history",
    "verify_models",
    "verify_node",
    "verify_receipts",
]


@dataclass(frozen=True)
class Finding:
    what: str  # commit, receipt, model file
    message: str


def _reachable(node: Node) -> list[str]:
    history = node.history
    seen: list[str] = []
    starts = [history.head_oid(), history.main_tip(), *history.snapshot_refs().values()]
    for start in starts:
        if start is None:
            continue
        for info in history.log(start):
            if info.oid in seen:
                break
            seen.append(info.oid)
    return seen


def verify_history(node: Node) -> tuple[int, list[Finding]]:
    """(commits checked, problems)."""
    findings: list[Finding] = []
    commits = 0
    try:
        oids = _reachable(node)
    except HistoryError as exc:
        return 0, [Finding("history", exc.one_line())]
    for oid in oids:
        commits += 1
        try:
            info, verified = node.reverify(oid)
            if verified.snapshot.serial != info.serial:
                raise RejectedError(f"commit {oid[:12]}", "Serial trailer differs from the payload")
        except (HistoryError, RejectedError) as exc:
            findings.append(Finding(f"commit {oid[:12]}", exc.one_line()))
    return commits, findings


def verify_receipts(node: Node) -> tuple[int, list[Finding]]:
    """(receipts checked, problems): each note line must be signed by this node's key."""
    from reconciler.core.envelope import (
        RECEIPT_TYPE,
        EnvelopeError,
        keyid_of,
        parse_envelope,
        valid_keyids,
    )

    findings: list[Finding] = []
    try:
        public = bytes.fromhex(node.paths.node_pub.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0, [Finding("receipts", f"cannot read {node.paths.node_pub}")]
    trusted = {keyid_of(public): public}
    count = 0
    for oid in node.history.noted_commits():
        for number, line in enumerate(node.history.notes(oid), start=1):
            count += 1
            where = f"receipt {number} on {oid[:12]}"
            try:
                envelope = parse_envelope(line.encode("utf-8"))
            except EnvelopeError as exc:
                findings.append(Finding(where, f"not an envelope: {exc}"))
                continue
            if envelope.payload_type != RECEIPT_TYPE or not valid_keyids(envelope, trusted):
                findings.append(Finding(where, "not signed by this node's key"))
                continue
            try:
                body = json.loads(envelope.payload)
            except ValueError:
                findings.append(Finding(where, "payload is not JSON"))
                continue
            info = node.history.info(oid)
            if body.get("config_digest") != info.digest:
                findings.append(Finding(where, "names another snapshot than its commit"))
    return count, findings


def verify_models(node: Node) -> tuple[int, list[Finding]]:
    """(model files hashed, problems): every blob and installed tree file, read in full.

    Nothing is deleted (``repair=False``); the store only forgets that a bad blob was ever
    verified, so the next ``once`` hashes it again and fetches it anew.
    """
    from reconciler.core.errors import ReconcilerError
    from reconciler.models.store import ModelStore

    store = ModelStore(node.paths)
    try:
        bad = store.verify_all(repair=False)
    except ReconcilerError as exc:
        return store.files_hashed, [Finding("models", exc.one_line())]
    except OSError as exc:
        return store.files_hashed, [Finding("models", f"cannot read {node.paths.models}: {exc}")]
    return store.files_hashed, [Finding(f"model file {b.path}", b.reason) for b in bad]


@dataclass(frozen=True)
class VerifyReport:
    findings: list[Finding]
    summary: str


def verify_node(node: Node) -> VerifyReport:
    commits, findings = verify_history(node)
    receipts, receipt_findings = verify_receipts(node)
    findings.extend(receipt_findings)
    model_files, model_findings = verify_models(node)
    findings.extend(model_findings)
    summary = f"checked {commits} commit(s), {receipts} receipt(s)"
    summary += f", {model_files} model file(s): " if model_files else ": "
    summary += f"{len(findings)} problem(s)" if findings else "all good"
    return VerifyReport(findings=findings, summary=summary)
