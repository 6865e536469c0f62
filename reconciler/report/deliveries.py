"""What became of the node's reports: ``<state>/report-state.json``.

Edge module (one small file). ``report.sender`` records each attempt here; ``status`` and
the metrics read it. The file is the node's own bookkeeping, not part of any report, and is
written atomically, so a reader sees the previous attempt or the new one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from reconciler.core.errors import ReconcilerError
from reconciler.disk.atomic import write_atomic

__all__ = ["DELIVERY_FILE", "Delivery", "DeliveryRecord", "read_deliveries", "record_delivery"]

log = logging.getLogger("reconciler")

DELIVERY_FILE = "report-state.json"


@dataclass(frozen=True)
class Delivery:
    """One attempt: where, when, and the HTTP status or the reason it failed."""

    at: str
    url: str
    ok: bool
    status: int | None  # the HTTP status; None when there was no answer
    message: str  # "201 Created", "timed out after 10 s", …


@dataclass(frozen=True)
class DeliveryRecord:
    """``<state>/report-state.json``: the last attempt, totals, and failures in a row."""

    last: Delivery | None = None
    sent: int = 0
    failed: int = 0
    failures_in_row: int = 0

    def after(self, delivery: Delivery) -> DeliveryRecord:
        return DeliveryRecord(
            last=delivery,
            sent=self.sent + (1 if delivery.ok else 0),
            failed=self.failed + (0 if delivery.ok else 1),
            failures_in_row=0 if delivery.ok else self.failures_in_row + 1,
        )


def read_deliveries(state_dir: Path) -> DeliveryRecord:
    """The delivery record; an empty one when none was written or it is unreadable."""
    try:
        obj = json.loads((state_dir / DELIVERY_FILE).read_bytes())
        last = obj.get("last")
        return DeliveryRecord(
            last=Delivery(**last) if last else None,
            sent=int(obj.get("sent", 0)),
            failed=int(obj.get("failed", 0)),
            failures_in_row=int(obj.get("failures_in_row", 0)),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return DeliveryRecord()


def _save(state_dir: Path, record: DeliveryRecord) -> None:
    body = asdict(record)
    try:
        write_atomic(state_dir / DELIVERY_FILE, (json.dumps(body, indent=2) + "\n").encode())
    except (OSError, ReconcilerError) as exc:
        log.warning("report: result not recorded: %s", exc)


def record_delivery(state_dir: Path, delivery: Delivery) -> DeliveryRecord:
    """Add one attempt to the record; a record that cannot be written is logged, no more."""
    record = read_deliveries(state_dir).after(delivery)
    _save(state_dir, record)
    return record
