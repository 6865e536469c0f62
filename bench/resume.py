"""resume: a 1 GiB download cut at 50 %, then resumed by the next pass.

The loopback ``FileServer`` cuts the connection after exactly half the body, then answers the
product's own retry with 503, so the first install process gives up with the partial file kept
(as when a mirror goes away mid-download). A second process — the next pass — resumes it. The
figure is the body bytes the server sent to the second process over the missing half
(target ≤ 1.01: at most 1 % beyond what was missing).

Also reported, without a target: the same after the first process is killed (SIGKILL) once
half the file is on disk — the bytes received but not yet written are sent again, so this
shows what a crash costs on top of what was missing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.harness import MIB, Context, Result, Target, load_average
from bench.model_install import install, start
from bench.network import model_entry, serve_model_files
from tests.support.fileserver import Fault, FileServer

NAME = "resume"


def _partial(state: Path, digest: str) -> Path:
    return state / "work" / "models" / "partial" / digest.removeprefix("sha256:")


def run(ctx: Context) -> list[Result]:
    size = 256 * MIB if ctx.quick else 1024 * MIB
    half = size // 2
    folder = ctx.folder("resume")
    server = FileServer(folder / "origin").start()
    try:
        (file,) = serve_model_files(server.root, {"model.bin": size}, seed="resume")
        models_file = folder / "models.json"
        models_file.write_text(json.dumps([model_entry("m", "v1", [file])]), encoding="utf-8")
        path = "/" + file.url

        # 1. The connection is cut at 50 %; the retry within the pass gets a 503.
        cut_state = folder / "cut"
        server.faults.queue(path, Fault(cut_after=half), Fault(status=503))
        install(cut_state, server.url, models_file, ok_codes=(1,))
        kept = _partial(cut_state, file.digest).stat().st_size
        server.stats.reset()
        install(cut_state, server.url, models_file)
        resent = server.stats.body_bytes(path)
        ranges = [h.get("range") for h in server.stats.headers(path)]

        # 2. The first process is killed once half the file is on disk.
        kill_state = folder / "kill"
        server.stats.reset()
        child = start(kill_state, server.url, models_file)
        partial = _partial(kill_state, file.digest)
        while child.poll() is None:
            if partial.exists() and partial.stat().st_size >= half:
                child.kill()
                break
            time.sleep(0.005)
        child.communicate()
        time.sleep(0.2)  # let the server notice the broken connection
        sent_before_kill = server.stats.body_bytes(path)
        on_disk = partial.stat().st_size
        server.stats.reset()
        install(kill_state, server.url, models_file)
        sent_after_kill = server.stats.body_bytes(path)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    missing = size - kept
    return [
        Result(
            name="resume.resent_over_missing",
            value=resent / missing,
            unit="x",
            target=Target(1.01),
            details={
                "bytes": size,
                "cut_after": half,
                "partial_kept": kept,
                "bytes_resent": resent,
                "range_headers": ranges,
                "load_1m": load_average(),
            },
        ),
        Result(
            name="resume.kill_waste",
            value=100 * (sent_before_kill + sent_after_kill - size) / size,
            unit="%",
            target=None,
            details={
                "bytes": size,
                "sent_before_kill": sent_before_kill,
                "on_disk_at_kill": on_disk,
                "sent_after_restart": sent_after_kill,
            },
        ),
    ]
