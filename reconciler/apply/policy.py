"""The failure policy (docs/contract.md §5): what a failed apply means for the node, by blame.

Pure. One decision, ``judge``, is used wherever an apply fails: at the end of an attempt
(``apply.transaction``) and when a snapshot is refused before any attempt (an unsafe container
definition). The transaction carries the verdict out; this module only decides.

* A veto (``HookVetoError``): nothing changed; not counted as a failure, nothing quarantined.
* Anything else not the snapshot's fault (``TransientError``): retried by the next pass.
* The snapshot's fault (``SnapshotFaultError``): quarantine it and roll back to the snapshot
  the node last converged on, unless this is that snapshot (drift repair, or the rollback
  itself failing: it ran before, so the fault is the node's and it is retried), or rollbacks
  are not allowed (the rollback's own converge: no apply/rollback loops), or there is
  nothing to go back to.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.errors import HookVetoError, ReconcilerError, SnapshotFaultError
from reconciler.core.outcome import ApplyResult

__all__ = ["Verdict", "judge"]


@dataclass(frozen=True, kw_only=True)
class Verdict:
    result: ApplyResult  # vetoed | failed | rolled-back
    error_kind: str  # the LastError kind: veto | apply | snapshot
    counted: bool  # one more apply failure (reconciler_apply_failures_total)
    quarantine: bool  # the digest is quarantined
    roll_back_to: str | None  # the digest to go back to


def judge(
    error: ReconcilerError, *, digest: str, applied: str | None, allow_rollback: bool
) -> Verdict:
    """The verdict on ``error`` while applying ``digest``, the node last converged on
    ``applied``."""
    if isinstance(error, HookVetoError):
        return Verdict(
            result=ApplyResult.VETOED,
            error_kind="veto",
            counted=False,
            quarantine=False,
            roll_back_to=None,
        )
    if not isinstance(error, SnapshotFaultError):
        return Verdict(
            result=ApplyResult.FAILED,
            error_kind="apply",
            counted=True,
            quarantine=False,
            roll_back_to=None,
        )
    ran_before = digest == applied
    back = applied if allow_rollback and applied is not None and not ran_before else None
    return Verdict(
        result=ApplyResult.ROLLED_BACK if back is not None else ApplyResult.FAILED,
        error_kind="apply" if ran_before else "snapshot",
        counted=True,
        quarantine=not ran_before,
        roll_back_to=back,
    )
