"""``python -m bench.model_install STATE_DIR ORIGIN_URL MODELS_JSON``: install models, alone.

The process the download benchmarks time: the product's own ``ModelStore.ensure`` with the
product's HTTP client (``download.new_client``), the settings' default concurrency and no disk
reserve, into the node folder ``STATE_DIR``. ``MODELS_JSON`` is a file holding a list of models
as a snapshot lists them. Prints one JSON object: seconds spent in ``ensure`` and the ids
changed. Exit 1 with the error's one line if the install fails.

``start`` and ``install`` are the parent's side: they run this module as a child process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler.config.settings import Settings
from reconciler.core.documents import ModelFile, ModelSpec
from reconciler.core.errors import ReconcilerError
from reconciler.core.paths import NodePaths
from reconciler.models.download import new_client
from reconciler.models.limits import DownloadLimits
from reconciler.models.progress import ProgressReporter
from reconciler.models.store import ModelStore


def start(state_dir: Path, origin_url: str, models_file: Path) -> subprocess.Popen[str]:
    from bench.harness import PYTHON, ROOT

    return subprocess.Popen(
        [PYTHON, "-m", "bench.model_install", str(state_dir), origin_url, str(models_file)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def install(
    state_dir: Path, origin_url: str, models_file: Path, *, ok_codes: Sequence[int] = (0,)
) -> tuple[float, int, dict[str, Any]]:
    """Run the child; (wall seconds of the whole process, exit code, what it printed)."""
    started = time.perf_counter()
    child = start(state_dir, origin_url, models_file)
    out, err = child.communicate()
    elapsed = time.perf_counter() - started
    if child.returncode not in ok_codes:
        raise RuntimeError(f"model install exited {child.returncode}: {err.strip()[-500:]}")
    return elapsed, child.returncode, json.loads(out) if child.returncode == 0 else {}


def _models(path: Path) -> list[ModelSpec]:
    return [
        ModelSpec(
            name=m["name"],
            version=m["version"],
            files=tuple(
                ModelFile(path=f["path"], size=f["size"], digest=f["digest"], urls=tuple(f["urls"]))
                for f in m["files"]
            ),
        )
        for m in json.loads(path.read_text(encoding="utf-8"))
    ]


def main(argv: list[str]) -> int:
    state_dir, origin_url, models_file = argv
    store = ModelStore(NodePaths(Path(state_dir)))
    models = _models(Path(models_file))
    settings = Settings()
    reporter = ProgressReporter(stream=io.StringIO(), interactive=True)
    started = time.perf_counter()
    try:
        with new_client() as client:
            report = store.ensure(
                models,
                client=client,
                base_url=origin_url,
                concurrency=settings.download_concurrency,
                reserve_bytes=0,
                limits=DownloadLimits.of(settings),
                progress_reporter=reporter,
            )
    except ReconcilerError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "ensure_s": seconds,
                "changed": list(report.changed),
                "peak_connections": reporter.peak_connections,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
