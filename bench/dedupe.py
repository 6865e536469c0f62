"""dedupe: version 2 of a 1 GiB, 10-file model that shares 9 files with version 1.

Version 1 (ten files of about 102 MiB) is installed from the loopback ``FileServer``; then
version 2 — the same nine files under new URLs plus one new file — is installed by a new
process, as the next apply would. The figure is the body bytes the server sent for version 2,
as a share of version 2's size (target ≤ 11 %: the one new file is 10 %).
"""

from __future__ import annotations

import json
import shutil

from bench.harness import MIB, Context, Result, Target, load_average
from bench.model_install import install
from bench.network import ModelFileOnDisk, model_entry, serve_model_files
from tests.support.fileserver import FileServer

NAME = "dedupe"
FILES = 10


def run(ctx: Context) -> list[Result]:
    total = 100 * MIB if ctx.quick else 1024 * MIB
    sizes = {f"model-{i:05d}-of-{FILES:05d}.safetensors": total // FILES for i in range(FILES)}
    folder = ctx.folder("dedupe")
    server = FileServer(folder / "origin").start()
    try:
        v1 = serve_model_files(server.root, sizes, seed="dedupe-v1")
        last = list(sizes)[-1]
        (new,) = serve_model_files(server.root, {last: sizes[last]}, seed="dedupe-v2")
        # Same digests, but listed under version 2's own URLs: only the digest may decide.
        v2 = [
            ModelFileOnDisk(f.path, f.size, f.digest, f.url.replace("dedupe-v1", "dedupe-v2"))
            for f in v1[:-1]
        ] + [new]
        for shared in v1[:-1]:
            target = server.root / shared.url.replace("dedupe-v1", "dedupe-v2")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.hardlink_to(server.root / shared.url)
        state = folder / "node"
        for version, files in (("v1", v1), ("v2", v2)):
            models_file = folder / f"{version}.json"
            models_file.write_text(
                json.dumps([model_entry("llm", version, files)]), encoding="utf-8"
            )
        install(state, server.url, folder / "v1.json")
        server.stats.reset()
        install(state, server.url, folder / "v2.json")
        sent = server.stats.total_body_bytes()
        requests = server.stats.total_requests()
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    v2_bytes = sum(f.size for f in v2)
    return [
        Result(
            name="dedupe.v2_bytes_share",
            value=100 * sent / v2_bytes,
            unit="%",
            target=Target(11),
            details={
                "model_bytes": v2_bytes,
                "bytes_sent_for_v2": sent,
                "requests_for_v2": requests,
                "new_file_bytes": new.size,
                "load_1m": load_average(),
            },
        )
    ]
