"""reconciler: keeps a GPU inference node on the network's signed configuration snapshot.

One subpackage per step of the workflow, top to bottom (docs/architecture.md):
``cli`` → ``agent`` (once, watch, rollback, resume, init) → ``apply`` (the transaction) beside
``report`` (status, log, verify, metrics) and ``network`` (publish) → ``intake`` (origin →
verified commit) → ``history`` (git), ``models`` (the model store) and ``runtime`` (Podman,
hooks), independent of each other → ``config`` (settings) → ``disk`` (atomic files, lock,
keys) → ``core``, the pure core (documents, trust, specs, plans, the node record). The layers
are enforced by import-linter (``.importlinter``).
"""

import sys

__version__ = "0.1.0"
__all__ = ["__version__"]

# httpx imports its command-line client (click, rich, pygments: ~60 ms) when it is imported,
# for a ``httpx`` command the agent never runs; with that module blocked httpx installs its
# stand-in. Every ``reconcile`` process and every model install pays the import otherwise.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
