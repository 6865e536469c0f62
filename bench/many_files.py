"""many_files: install one model of many small files, at N and 10N files.

Most models are a handful of large shards, but tokenizers, adapters and datasets come as
thousands of small files, and then the cost per file decides, not the bytes. Each size is
installed from the loopback ``FileServer`` by a fresh process (``bench.model_install``: the
product's ``ModelStore.ensure``, default concurrency); the figure is how the whole install time
grows from N to 10N files (target ≤ 12x, as for the plan: about linear, where a cost per file
that grew with the number of files recorded would show as far more). Files per second are
reported beside it.
"""

from __future__ import annotations

import json
import shutil

from bench.harness import Baseline, Context, Result, Target, load_average
from bench.model_install import install
from bench.network import model_entry, serve_model_files
from tests.support.fileserver import FileServer

NAME = "many_files"
FILE_BYTES = 4096


def _install_seconds(ctx: Context, files: int) -> float:
    folder = ctx.folder(f"many_files/{files}")
    server = FileServer(folder / "origin").start()
    try:
        sizes = {f"chunks/{i // 1000:03d}/part-{i:06d}.bin": FILE_BYTES for i in range(files)}
        served = serve_model_files(server.root, sizes, seed=f"many-{files}")
        models_file = folder / "models.json"
        models_file.write_text(json.dumps([model_entry("corpus", "v1", served)]), "utf-8")
        seconds, _code, _printed = install(folder / "node", server.url, models_file)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    return seconds


def run(ctx: Context) -> list[Result]:
    base = 200 if ctx.quick else 1_000
    small = _install_seconds(ctx, base)
    large = _install_seconds(ctx, base * 10)
    return [
        Result(
            name="many_files.growth",
            value=large / small,
            unit="x",
            target=Target(12),
            baseline=Baseline(f"the same install of {base} files", small * 1000, "ms"),
            details={
                "files": {"1x": base, "10x": base * 10},
                "file_bytes": FILE_BYTES,
                "seconds": {"1x": round(small, 2), "10x": round(large, 2)},
                "files_per_s": {"1x": round(base / small), "10x": round(base * 10 / large)},
                "load_1m": load_average(),
            },
        )
    ]
