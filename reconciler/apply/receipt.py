"""The apply receipt (docs/contract.md §4): what one attempt did, signed by the node and
noted on the commit it applied.

Where it sits: every end of an attempt builds one ``Receipt``: the attempt itself
(``apply.attempt``), an apply refused before any attempt, and the ``interrupted`` receipt the
next pass writes for an agent that died mid-apply (``apply.recovery``). ``sign_and_note`` is
the one way a receipt reaches ``refs/notes/applied``; a receipt that cannot be written is
logged and never fails the apply. It also gives the receipt the rollout entry of the commit
it notes (the ``Rollout-*`` trailers of a commit that became HEAD through a wave,
docs/contract.md §8), so that every attempt on that commit says how the node came to it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.core.documents import ModelSpec, format_time
from reconciler.core.errors import HistoryError, ReconcilerError
from reconciler.core.outcome import ApplyResult
from reconciler.history.receipts import receipt_line
from reconciler.history.repo import History

__all__ = ["AttemptDetail", "Receipt", "sign_and_note", "tree_digest"]

log = logging.getLogger("reconciler")


def tree_digest(model: ModelSpec) -> str:
    """sha256 over ``<path>\\0<file digest>\\n`` of a model's files, sorted by path."""
    lines = "".join(f"{f.path}\0{f.digest}\n" for f in sorted(model.files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(lines.encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AttemptDetail:
    """The parts only a real attempt has (JSON-ready values)."""

    steps: tuple[dict[str, Any], ...]
    containers: tuple[dict[str, Any], ...]  # seen at the end
    models: dict[str, str]  # model id → tree digest
    participation: dict[str, list[str]]  # joined, left, subclouds
    hooks: tuple[dict[str, Any], ...]


@dataclass(frozen=True, kw_only=True)
class Receipt:
    commit: str
    config_digest: str | None
    serial: int | None
    result: ApplyResult
    reason: str | None
    started_at: str | None
    finished_at: str
    error: str | None
    actions: tuple[dict[str, Any], ...] = ()
    detail: AttemptDetail | None = None
    note: str | None = None
    # How the commit became HEAD through a rollout: {wave, wave_at, position, entered_at}.
    rollout: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config_digest": self.config_digest,
            "serial": self.serial,
            "commit": self.commit,
            "result": self.result.value,
            "reason": self.reason,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "agent_version": __version__,
            "error": self.error,
            "actions": list(self.actions),
        }
        if self.detail is not None:
            out["steps"] = list(self.detail.steps)
            out["containers"] = list(self.detail.containers)
            out["models"] = dict(self.detail.models)
            out["participation"] = dict(self.detail.participation)
            out["hooks"] = list(self.detail.hooks)
        if self.note is not None:
            out["note"] = self.note
        if self.rollout is not None:
            out["rollout"] = dict(self.rollout)
        return out


def _with_rollout(history: History, receipt: Receipt) -> Receipt:
    """``receipt`` with its commit's rollout entry, when the commit has one."""
    if receipt.rollout is not None:
        return receipt
    try:
        info = history.info(receipt.commit)
    except HistoryError:  # not a snapshot commit (an operator's own): nothing to add
        return receipt
    if info.admission is None:
        return receipt
    entry = {
        "wave": info.admission.wave,
        "wave_at": format_time(info.admission.wave_at),
        "position": str(info.admission.position),
        "entered_at": format_time(info.time),  # when that commit moved main
    }
    return replace(receipt, rollout=entry)


def sign_and_note(history: History, receipt: Receipt, *, node_key: Path) -> None:
    """Sign ``receipt`` with the node key and append it to the notes of its commit."""
    receipt = _with_rollout(history, receipt)
    try:
        history.append_note(receipt.commit, receipt_line(receipt.payload(), node_key=node_key))
    except ReconcilerError as exc:
        log.error("receipt not written: %s", exc.one_line())
