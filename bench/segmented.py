"""segmented: model downloads against aria2c on a loopback nginx that caps each connection.

nginx serves with ``limit_rate`` (16 MB/s per connection; CDNs and model hubs cap the same
way). The product side is a whole process (``python -m bench.model_install``: the product's
``ModelStore.ensure`` with the settings' defaults); the peer is ``aria2c`` followed by
``sha256sum``, timed in the same interleaved rounds. Four figures:

* ``segmented.big_vs_aria2`` — one file of 1 GiB (256 MiB with ``--quick``) against
  ``aria2c -x8 -s8 -k1M`` + ``sha256sum`` (target ≤ 1.0x);
* ``segmented.big_link_share`` — the product's rate over the cap times the connections it
  used at its peak (target ≥ 0.8);
* ``segmented.many_small_vs_aria2`` — 1,000 files of 16 KiB (200 with ``--quick``), nginx
  uncapped, against ``aria2c -j16 -i list`` + ``sha256sum`` of every file (target ≤ 1.0x);
* ``segmented.stall_over_clean`` — the big file with a second mirror listed first that stalls
  every request after 1 MiB (the test ``FileServer``), over the same download without it
  (target ≤ 2.0x).

The resume figure after SIGKILL is in ``bench/resume.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.harness import (
    MIB,
    Baseline,
    Context,
    Result,
    Target,
    interleaved,
    load_average,
    median,
    timed,
)
from bench.model_install import install
from bench.network import model_entry, serve_model_files
from bench.nginx_origin import start_nginx
from tests.support.fileserver import FileServer

NAME = "segmented"
CAP = "16m"
CAP_BYTES_PER_S = 16 * MIB  # nginx's "m" is MiB


def _product(state: Path, origin_url: str, models_file: Path, peaks: list[int]) -> float:
    shutil.rmtree(state, ignore_errors=True)
    elapsed, _code, printed = install(state, origin_url, models_file)
    peaks.append(int(printed.get("peak_connections", 0)))
    return elapsed


def _aria2(script: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return timed(["bash", "-c", "set -o pipefail; " + script])


# The peer for one big file: eight connections of 1 MiB pieces, then the digest a node checks.
ARIA2_ONE_FILE = "aria2c -x8 -s8 -k1M + sha256sum"


def aria2_one_file(url: str, out: Path) -> float:
    """Seconds ``aria2c -x8 -s8 -k1M`` takes to download ``url`` into (an emptied) ``out``
    and ``sha256sum`` to hash it."""
    return _aria2(
        f"aria2c -q -x8 -s8 -k1M --file-allocation=none -d {out} -o f {url} "
        f"&& sha256sum {out}/f >/dev/null",
        out,
    )


def _big(ctx: Context, folder: Path, size: int, runs: int) -> tuple[list[Result], float]:
    files = serve_model_files(folder / "origin", {"model.safetensors": size}, seed="seg")
    models_file = folder / "big.json"
    models_file.write_text(json.dumps([model_entry("big", "v1", files)]), encoding="utf-8")
    nginx = start_nginx(folder / "origin", folder / "nginx", limit_rate=CAP)
    assert nginx is not None
    url = nginx.url + files[0].url
    out = folder / "aria2"
    peaks: list[int] = []
    try:
        samples = interleaved(
            {
                "product": lambda: _product(folder / "node", nginx.url, models_file, peaks),
                "aria2c": lambda: aria2_one_file(url, out),
            },
            runs=runs,
        )
    finally:
        nginx.close()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder / "node", ignore_errors=True)
    product, peer = median(samples["product"]), median(samples["aria2c"])
    peak = max(peaks) if peaks else 0
    share = size / product / (CAP_BYTES_PER_S * max(1, peak))
    details: dict[str, Any] = {
        "bytes": size,
        "limit_rate": CAP,
        "median_s": {"product_process": round(product, 3), "aria2c+sha256sum": round(peer, 3)},
        "product_MB_per_s": round(size / product / 1e6, 1),
        "peak_connections": peak,
        "runs": runs,
        "load_1m": load_average(),
    }
    return [
        Result(
            name="segmented.big_vs_aria2",
            value=product / peer,
            unit="x",
            target=Target(1.0),
            baseline=Baseline(ARIA2_ONE_FILE, peer, "s"),
            details=details,
        ),
        Result(
            name="segmented.big_link_share",
            value=share,
            unit="x",
            target=Target(0.8, ">="),
            baseline=Baseline(f"{CAP}/s per connection x {peak} connections", peak, ""),
            details=details,
        ),
    ], product


def _stall(folder: Path, size: int, clean_s: float) -> Result:
    files = serve_model_files(folder / "origin", {"model.safetensors": size}, seed="seg")
    nginx = start_nginx(folder / "origin", folder / "nginx-stall", limit_rate=CAP)
    assert nginx is not None
    stalling = FileServer(folder / "origin").start()
    stalling.faults.set(files[0].url, stall_after=MIB)
    entry = model_entry("big", "v1", files)
    entry["files"][0]["urls"] = [stalling.url + files[0].url, nginx.url + files[0].url]
    models_file = folder / "stall.json"
    models_file.write_text(json.dumps([entry]), encoding="utf-8")
    try:
        peaks: list[int] = []
        took = _product(folder / "node", nginx.url, models_file, peaks)
    finally:
        stalling.close()
        nginx.close()
        shutil.rmtree(folder / "node", ignore_errors=True)
    return Result(
        name="segmented.stall_over_clean",
        value=took / clean_s,
        unit="x",
        target=Target(2.0),
        baseline=Baseline("the same download without the stalling mirror", clean_s, "s"),
        details={"bytes": size, "stall_after": MIB, "seconds": round(took, 3)},
    )


def _many(folder: Path, count: int, runs: int) -> Result:
    sizes = {f"shards/part-{i:05d}.bin": 16 * 1024 for i in range(count)}
    files = serve_model_files(folder / "small", sizes, seed="many")
    models_file = folder / "many.json"
    models_file.write_text(json.dumps([model_entry("many", "v1", files)]), encoding="utf-8")
    nginx = start_nginx(folder / "small", folder / "nginx-many")
    assert nginx is not None
    out = folder / "aria2-many"
    listing = folder / "list.txt"
    listing.write_text("".join(f"{nginx.url}{f.url}\n  out={i}.bin\n" for i, f in enumerate(files)))
    try:
        samples = interleaved(
            {
                "product": lambda: _product(folder / "node", nginx.url, models_file, []),
                "aria2c": lambda: _aria2(
                    f"aria2c -q -j16 --file-allocation=none -d {out} -i {listing} "
                    f"&& sha256sum {out}/*.bin >/dev/null",
                    out,
                ),
            },
            runs=runs,
        )
    finally:
        nginx.close()
        shutil.rmtree(folder / "node", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    product, peer = median(samples["product"]), median(samples["aria2c"])
    return Result(
        name="segmented.many_small_vs_aria2",
        value=product / peer,
        unit="x",
        target=Target(1.0),
        baseline=Baseline(f"aria2c -j16 -i list + sha256sum ({count} files)", peer, "s"),
        details={
            "files": count,
            "file_bytes": 16 * 1024,
            "median_s": {"product_process": round(product, 3), "aria2c+sha256sum": round(peer, 3)},
            "load_1m": load_average(),
        },
    )


def run(ctx: Context) -> list[Result]:
    if shutil.which("aria2c") is None:
        raise RuntimeError("aria2c is not installed (.ci/setup installs it)")
    size = 256 * MIB if ctx.quick else 1024 * MIB
    runs = 2 if ctx.quick else 3
    folder = ctx.folder("segmented")
    try:
        results, clean_s = _big(ctx, folder, size, runs)
        results.append(_stall(folder, size, clean_s))
        results.append(_many(folder, 200 if ctx.quick else 1000, runs))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results
