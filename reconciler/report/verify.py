"""``reconcile verify``: re-check what is on disk against what was signed.

Edge module (reads git, files). Every commit reachable from HEAD, ``main`` and the snapshot refs
is re-verified against the root that accepted it (``Root-Version``), ignoring expiry and
serial (docs/contract.md §3); every receipt against ``node.pub``; the hash of every model blob and
installed model file (via the model store); and the modes the agent gives what it writes
(``core.paths``: state folder, ``node.key``, ``runtime/``, model blobs, the metrics file and
the report record) with strict modes on the hooks folder and the metrics file's folder. It
reports each problem on its own line; it repairs nothing (``reconcile init`` again restores
the modes).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.errors import HistoryError, RejectedError, SettingsError
from reconciler.core.paths import (
    BLOB_MODE,
    NODE_KEY_MODE,
    RUNTIME_DIR_MODE,
    RUNTIME_FILE_MODE,
    STATE_DIR_GROUP_MODE,
    STATE_DIR_MODE,
)
from reconciler.disk.strict import check_trusted, trusted_group
from reconciler.history.node import Node
from reconciler.report.metrics import check_metrics_folder

_HOOK_NAMES = ("pre-apply", "post-apply", "agent-update")  # docs/contract.md §7

__all__ = [
    "Finding",
    "VerifyReport",
    "verify_history",
    "verify_models",
    "verify_modes",
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


def _mode_problem(st: os.stat_result, *, expected: int) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    return None if mode == expected else f"mode {mode:04o}, expected {expected:04o}"


def _state_dir_findings(node: Node) -> Iterator[Finding]:
    folder = node.paths.state_dir
    group = node.settings.state_group
    expected = STATE_DIR_GROUP_MODE if group is not None else STATE_DIR_MODE
    st = folder.stat()
    problem = _mode_problem(st, expected=expected)
    if problem:
        yield Finding(f"state folder {folder}", problem)
    if group is not None:
        try:
            gid = trusted_group(group, setting="state_group").gid
        except SettingsError as exc:
            yield Finding(f"state folder {folder}", exc.one_line())
            return
        if st.st_gid != gid:
            yield Finding(f"state folder {folder}", f"group is gid {st.st_gid}, not {group}")
    if node.paths.node_key.exists():
        problem = _mode_problem(node.paths.node_key.stat(), expected=NODE_KEY_MODE)
        if problem:
            yield Finding(f"node key {node.paths.node_key}", problem)


def _runtime_findings(node: Node) -> Iterator[Finding]:
    """``runtime/``: readable by the containers (others may read), writable only by the agent."""
    folder = node.paths.runtime
    if not folder.is_dir():
        return
    problem = _mode_problem(folder.stat(), expected=RUNTIME_DIR_MODE)
    if problem:
        yield Finding(f"runtime folder {folder}", problem)
    for path in sorted(folder.iterdir()):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o022 or not mode & stat.S_IROTH:
            yield Finding(
                f"runtime file {path}", f"mode {mode:04o}, expected {RUNTIME_FILE_MODE:04o}"
            )


def _written_findings(node: Node) -> Iterator[Finding]:
    """The metrics file and the report record: others may read them, never write; nor may
    anyone but root or the agent write the metrics file's folders (strict modes)."""
    from reconciler.report.deliveries import DELIVERY_FILE

    metrics = node.settings.metrics_path
    for what, path in (
        ("metrics file", Path(metrics) if metrics else None),
        ("report record", node.paths.state_dir / DELIVERY_FILE),
    ):
        if path is not None and path.exists() and path.stat().st_mode & stat.S_IWOTH:
            yield Finding(f"{what} {path}", "writable by others")
    if metrics:
        try:
            check_metrics_folder(Path(metrics))  # what the next pass would refuse to write into
        except SettingsError as exc:
            yield Finding(f"metrics file {metrics}", exc.one_line())


def _blob_findings(node: Node) -> Iterator[Finding]:
    from reconciler.models.layout import StoreLayout

    blobs = StoreLayout.of(node.paths).blob_dir
    for path in sorted(blobs.iterdir()) if blobs.is_dir() else ():
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            problem = _mode_problem(st, expected=BLOB_MODE)
            if problem:
                yield Finding(f"model blob {path.name[:12]}", problem)


def verify_modes(node: Node) -> list[Finding]:
    """Drift from the modes the agent writes, and a hooks folder that strict modes refuse."""
    findings: list[Finding] = []
    try:
        for check in (_state_dir_findings, _runtime_findings, _written_findings, _blob_findings):
            findings.extend(check(node))
    except OSError as exc:
        findings.append(Finding("modes", f"cannot check: {exc}"))
    hooks = Path(node.settings.hooks_dir)
    group = node.settings.strict_modes_group
    try:
        check_trusted(hooks, what="hooks folder", group=group)
        for name in _HOOK_NAMES:
            check_trusted(hooks / name, what="hook", group=group)
    except SettingsError as exc:
        findings.append(Finding("hooks", exc.one_line()))
    return findings


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
    findings.extend(verify_modes(node))
    summary = f"checked {commits} commit(s), {receipts} receipt(s)"
    summary += f", {model_files} model file(s): " if model_files else ": "
    summary += f"{len(findings)} problem(s)" if findings else "all good"
    return VerifyReport(findings=findings, summary=summary)
