"""One apply attempt's log: the steps taken, each container action, each hook, for its receipt.

Where it sits: the transaction starts an ``AttemptLog`` when an attempt begins (step 3) and
every step writes into it; the receipt (``apply.receipt``) is built from it at the end. It is
the one mutable thing of an attempt, on purpose: a step that fails half-way (the third of
five container actions) has still done the first two, and the receipt must say so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from reconciler.apply.edges import Clock
from reconciler.apply.receipt import AttemptDetail, Receipt, tree_digest
from reconciler.apply.target import ApplyTarget
from reconciler.core.documents import format_time
from reconciler.core.outcome import ApplyResult
from reconciler.runtime.hooks import HookResult
from reconciler.runtime.podman import ActionOutcome

__all__ = ["AttemptLog"]

log = logging.getLogger("reconciler")


class AttemptLog:
    """What one attempt to converge to ``target`` did, in order."""

    def __init__(self, target: ApplyTarget, *, reason: str, clock: Clock) -> None:
        self.target = target
        self.reason = reason
        self._clock = clock
        self.started = clock()
        self.outcomes: list[ActionOutcome] = []
        self.steps: list[dict[str, Any]] = []
        self.hooks: list[HookResult] = []

    def step(self, name: str, detail: str) -> None:
        log.info("apply %s: %s", name, detail)
        self.steps.append({"step": name, "detail": detail, "at": format_time(self._clock())})

    def outcome(self, outcome: ActionOutcome) -> None:
        self.outcomes.append(outcome)
        log.info(
            "%s %s (%s)",
            "done" if outcome.ok else "FAILED",
            outcome.action.describe(),
            outcome.message,
        )

    def hook(self, result: HookResult) -> None:
        self.hooks.append(result)

    def receipt(
        self,
        *,
        result: ApplyResult,
        error: str | None,
        containers: Sequence[dict[str, Any]],
        joined: Sequence[str],
        left: Sequence[str],
    ) -> Receipt:
        target = self.target
        return Receipt(
            commit=target.commit,
            config_digest=target.digest,
            serial=target.serial,
            result=result,
            reason=self.reason,
            started_at=format_time(self.started),
            finished_at=format_time(self._clock()),
            error=error,
            actions=tuple(o.to_json() for o in self.outcomes),
            detail=AttemptDetail(
                steps=tuple(self.steps),
                containers=tuple(containers),
                models={m.id: tree_digest(m) for m in target.snapshot.models},
                participation={
                    "joined": list(joined),
                    "left": list(left),
                    "subclouds": list(target.view.subclouds),
                },
                hooks=tuple(h.to_json() for h in self.hooks),
            ),
        )
