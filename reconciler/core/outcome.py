"""What a converge pass ended with: its result word and the outcome the agent and CLI report.

Pure. ``ApplyResult`` values are wire strings: the receipts' ``result`` field, the
``RECONCILE_RESULT`` of ``post-apply`` (docs/apply-order.md, "Outcomes") and what logs and
benchmarks show. Changing one changes the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["ApplyResult", "ConvergeOutcome"]


class ApplyResult(StrEnum):
    # An attempt's end (receipt, post-apply and outcome):
    CONVERGED = "converged"
    VETOED = "vetoed"  # pre-apply refused
    FAILED = "failed"  # not the snapshot's fault, or nothing to roll back to
    ROLLED_BACK = "rolled-back"  # the snapshot's fault: back on the last converged one
    # Receipt only, written by the pass after an agent that died mid-apply:
    INTERRUPTED = "interrupted"
    # Outcome only, when no attempt was made:
    NOOP = "noop"  # already converged
    NOTHING = "nothing"  # no snapshot yet
    QUARANTINED = "quarantined"  # HEAD is quarantined and not what the node runs


@dataclass(frozen=True, kw_only=True)
class ConvergeOutcome:
    converged: bool
    result: ApplyResult
    message: str  # one line for the CLI and the log
    digest: str | None = None
    duration_s: float = 0.0
    actions: tuple[str, ...] = ()  # the container actions carried out, described
