"""Each model's state in the network's vocabulary (Pending, Active, Failed, Inactive), from
what the store holds.

Where it sits: ``reconcile status`` and the node record ask ``ModelStore.states``; the answer
comes from the trees (``is_installed``), the index's last fetch failures and the list of
installed trees.

What it may not do: change anything or contact anything; it costs what ``is_installed`` costs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.core.documents import ModelSpec
from reconciler.models.index import Index
from reconciler.models.layout import blob_hex
from reconciler.models.trees import Trees

__all__ = ["ModelState", "ModelStatus", "model_states"]


class ModelState(enum.Enum):
    """A model's state in the network's vocabulary."""

    PENDING = "Pending"  # wanted; not (fully) on disk yet
    ACTIVE = "Active"  # wanted; installed and verified
    FAILED = "Failed"  # wanted; its last fetch served bytes that failed verification
    INACTIVE = "Inactive"  # installed, not wanted by this snapshot (kept for a rollback)


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    state: ModelState
    reason: str | None = None  # why Failed, or what a Pending model last ran into


def model_states(models: Sequence[ModelSpec], *, index: Index, trees: Trees) -> list[ModelStatus]:
    """The state of each model of a snapshot, then Inactive for other installed trees."""
    failures = index.contents().failures
    result = []
    for model in models:
        if trees.is_installed(model):
            result.append(ModelStatus(model.id, ModelState.ACTIVE))
            continue
        failed = [
            (f, failures[blob_hex(f.digest)]) for f in model.files if blob_hex(f.digest) in failures
        ]
        bad = [(f, e) for f, e in failed if e.kind == "verification"]
        if bad:
            file, failure = bad[0]
            result.append(
                ModelStatus(model.id, ModelState.FAILED, f"{file.path}: {failure.reason}")
            )
        elif failed:
            file, failure = failed[0]
            result.append(
                ModelStatus(model.id, ModelState.PENDING, f"{file.path}: {failure.reason}")
            )
        else:
            result.append(ModelStatus(model.id, ModelState.PENDING))
    wanted = {m.id for m in models}
    for installed in trees.installed():
        if installed.model_id not in wanted:
            result.append(ModelStatus(installed.model_id, ModelState.INACTIVE))
    return result
