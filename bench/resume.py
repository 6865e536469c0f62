"""resume: a 1 GiB segmented download stopped at 50 %, then resumed by the next pass.

The product is a whole process (``bench.model_install``: ``ModelStore.ensure`` with the
settings' defaults, so the file comes down in byte ranges over several connections). Two ways
to stop at half the file:

* ``resume.resent_over_missing`` — the mirror (the loopback ``FileServer``, which counts body
  bytes per path but not per request) goes away: once it has sent half the body, every
  new request gets 503, the process gives up with the partial file and its ``.parts`` record
  kept. After the next pass, the body bytes the mirror sent over the bytes the record did not
  hold (target ≤ 1.01: at most 1 % beyond what was missing).
* ``resume.kill_resent`` — the issue's figure: the process is killed (SIGKILL) once its
  record holds half the file, downloading from nginx (16 MiB/s per connection, every request
  logged with its ``Range`` and the body bytes sent). The bytes that were on disk and right at
  that moment are found independently of the product's record, by comparing the partial file
  with the source block by block; the next pass's requests give the ranges it was sent. The
  figure is the bytes of those ranges that were already right on disk, over the bytes that were
  (target ≤ 1 %).
* ``resume.kill_waste`` (no target) — all bytes sent for the file over its size, minus one:
  what the crash cost in all, with the bytes in flight that never reached the disk and the
  overshoot of ranges split at the tail (a connection whose range was cut short has received
  what the mirror already pushed into its socket).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import MIB, Context, Result, Target, load_average
from bench.model_install import install, start
from bench.network import model_entry, serve_model_files
from bench.nginx_origin import start_nginx
from reconciler.models.partial import PartsRecord, record_path
from tests.support.fileserver import FileServer

NAME = "resume"
_BLOCK = 4096  # the granularity of the on-disk comparison (a filesystem block)
_WINDOW = 1 << 20


def _partial(state: Path, digest: str) -> Path:
    return state / "work" / "models" / "partial" / digest.removeprefix("sha256:")


def _recorded(partial: Path) -> int:
    record = PartsRecord.load(record_path(partial))
    return sum(end - start for start, end in record.written) if record is not None else 0


def _right_ranges(partial: Path, source: Path) -> list[tuple[int, int]]:
    """The ranges of ``partial`` equal to ``source`` at the same offset, in whole blocks (the
    source is random: a hole or a stale block never matches)."""
    ranges: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))

    offset = 0
    with partial.open("rb") as got, source.open("rb") as want:
        while b := want.read(_WINDOW):
            a = got.read(_WINDOW)
            if a == b:
                add(offset, offset + len(b))
            else:
                for at in range(0, len(b), _BLOCK):
                    if a[at : at + _BLOCK] == b[at : at + _BLOCK]:
                        add(offset + at, offset + min(len(b), at + _BLOCK))
            offset += len(b)
    return ranges


def _when_sent(server: FileServer, path: str, count: int, act: Any) -> threading.Thread:
    """Call ``act()`` once the server has sent ``count`` body bytes of ``path``."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while server.stats.body_bytes(path) < count and time.monotonic() < deadline:
            time.sleep(0.002)
        act()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _mirror_goes_away(
    server: FileServer, folder: Path, models_file: Path, *, path: str, size: int, digest: str
) -> Result:
    state = folder / "cut"
    server.stats.reset()
    watcher = _when_sent(server, path, size // 2, lambda: server.faults.set(path, status=503))
    install(state, server.url, models_file, ok_codes=(1,))
    watcher.join()
    kept = _recorded(_partial(state, digest))
    server.faults.clear(path)
    server.stats.reset()
    install(state, server.url, models_file)
    resent = server.stats.body_bytes(path)
    missing = size - kept
    return Result(
        name="resume.resent_over_missing",
        value=resent / missing,
        unit="x",
        target=Target(1.01),
        details={
            "bytes": size,
            "stopped_after_sent": size // 2,
            "recorded_at_stop": kept,
            "bytes_resent": resent,
            "requests_after": server.stats.requests(path),
            "load_1m": load_average(),
        },
    )


def _killed(folder: Path, *, size: int) -> list[Result]:
    """SIGKILL at half the file, from nginx (16 MiB/s per connection, each request logged with
    its Range and the body bytes it sent), then the next pass."""
    origin = folder / "kill-origin"
    (file,) = serve_model_files(origin, {"model.bin": size}, seed="resume-kill")
    models_file = folder / "kill.json"
    models_file.write_text(json.dumps([model_entry("m", "v1", [file])]), encoding="utf-8")
    nginx = start_nginx(origin, folder / "nginx", limit_rate="16m", log_bytes=True)
    if nginx is None:
        raise RuntimeError("nginx is not installed (.ci/setup installs nginx-light)")
    state = folder / "kill"
    partial = _partial(state, file.digest)
    try:
        child = start(state, nginx.url, models_file)
        while child.poll() is None and _recorded(partial) < size // 2:
            time.sleep(0.002)
        child.kill()
        child.communicate()
        if child.returncode == 0:
            raise RuntimeError("the install finished before it was killed")
        time.sleep(0.3)  # nginx logs the broken requests once it notices
        sent_before = nginx.body_bytes_sent()
        right = _right_ranges(partial, origin / file.url)
        recorded = _recorded(partial)
        nginx.reset_log()
        install(state, nginx.url, models_file)
        sent = _sent_ranges(nginx.requests())
    finally:
        nginx.close()
    right_bytes = sum(end - start for start, end in right)
    sent_again = _overlap(sent, right)
    sent_after = sum(end - start for start, end in sent)
    details: dict[str, Any] = {
        "bytes": size,
        "sent_before_kill": sent_before,
        "right_on_disk_at_kill": right_bytes,
        "recorded_at_kill": recorded,
        "sent_after_restart": sent_after,
        "right_bytes_sent_again": sent_again,
        "load_1m": load_average(),
    }
    return [
        Result(
            name="resume.kill_resent",
            value=100 * sent_again / max(1, right_bytes),
            unit="%",
            target=Target(1.0),
            details=details,
        ),
        Result(
            name="resume.kill_waste",
            value=100 * (sent_before + sent_after - size) / size,
            unit="%",
            target=None,
            details=details,
        ),
    ]


def _sent_ranges(requests: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """The byte ranges each request's body covered: from the start it asked for, as many
    bytes as nginx sent (a request the client closed early sent less than it asked)."""
    ranges = []
    for status, sent, asked in requests:
        start = 0
        if status == 206 and asked.startswith("bytes="):
            start = int(asked.removeprefix("bytes=").split("-", 1)[0])
        if sent:
            ranges.append((start, start + sent))
    return ranges


def _overlap(sent: list[tuple[int, int]], right: list[tuple[int, int]]) -> int:
    total = 0
    for a, b in sent:
        for c, d in right:
            total += max(0, min(b, d) - max(a, c))
    return total


def run(ctx: Context) -> list[Result]:
    size = 256 * MIB if ctx.quick else 1024 * MIB
    folder = ctx.folder("resume")
    server = FileServer(folder / "origin").start()
    try:
        (file,) = serve_model_files(server.root, {"model.bin": size}, seed="resume")
        models_file = folder / "models.json"
        models_file.write_text(json.dumps([model_entry("m", "v1", [file])]), encoding="utf-8")
        where = {"path": "/" + file.url, "size": size, "digest": file.digest}
        results = [_mirror_goes_away(server, folder, models_file, **where)]
        results += _killed(folder, size=size)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    return results
