"""``python -m bench.open_audit FOLDER REPORT -- ARGS…``: run ``reconcile ARGS`` in-process and
record every file it opens under FOLDER.

A ``sys.audit`` hook sees each ``open`` (built-in ``open``, ``io.open`` and ``os.open``) before
it happens; paths under FOLDER other than the model store's own index are written to REPORT
(JSON) together with the command's exit status. Used by the no-op benchmark to show that a
converged pass reads no model file at all.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_INDEX = ".index.json"


def main(argv: list[str]) -> int:
    folder, report, separator, *args = argv
    if separator != "--":
        raise SystemExit("usage: python -m bench.open_audit FOLDER REPORT -- ARGS…")
    prefix = os.path.join(os.path.realpath(folder), "")
    opened: list[str] = []

    def hook(event: str, details: tuple[object, ...]) -> None:
        if event != "open" or not details or not isinstance(details[0], str | bytes):
            return
        path = os.path.realpath(os.fsdecode(details[0]))
        if path.startswith(prefix) and not os.path.basename(path).startswith(_INDEX):
            opened.append(path)

    sys.addaudithook(hook)
    from reconciler.cli import cli

    try:
        cli.main(args=args, prog_name="reconcile", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    Path(report).write_text(json.dumps({"exit": code, "opened": opened}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
