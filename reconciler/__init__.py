"""reconciler: keeps a GPU inference node on the network's signed configuration snapshot.

The workflow, module by module: settings → origin (fetch bytes) → trust (verify) → history
(commit to git) → observe (Podman, model store) → plan → apply (models, containers, runtime
files, hooks, receipts) → agent (once / watch) → cli.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
