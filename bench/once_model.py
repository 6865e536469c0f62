"""once_model: the real ``reconcile once`` installing a 1 GiB model file from a capped mirror,
against ``aria2c -x8 -s8 -k1M`` followed by ``sha256sum``.

The issue's "done when": ``reconcile once`` on a capped mirror beats aria2c + sha256sum. The
node is a real one (``reconcile init`` against a signed loopback origin, the Podman lab's
service, the settings' defaults but no disk reserve); its snapshot has one model of one file
(1 GiB, 256 MiB with ``--quick``) whose URL is on nginx with ``limit_rate 16m`` per
connection. Each product run starts from an empty node and times the whole process of
``reconcile once``: start, fetch and verify the snapshot, commit it, download the file in
segments, verify, store, install the tree, record. The peer downloads the same URL and
hashes it; runs are interleaved.

* ``once_model.vs_aria2`` — ``reconcile once`` over aria2c + sha256sum (target ≤ 1.0x).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.converged import podman_lab
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
from bench.network import BenchNode, SignedOrigin, model_entry, serve_model_files, snapshot_body
from bench.nginx_origin import start_nginx
from bench.segmented import ARIA2_ONE_FILE, aria2_one_file

NAME = "once_model"
CAP = "16m"


def _once(home: Path, origin: SignedOrigin, podman_url: str, blob: Path) -> float:
    shutil.rmtree(home, ignore_errors=True)
    node = BenchNode(home).init(
        origin.url, origin.root_envelope, podman_url=podman_url, disk_reserve_bytes=0
    )
    took = timed(node.argv("once"), env=node.env())
    if not blob.is_file():
        raise RuntimeError(f"`reconcile once` ended without the model file {blob}")
    return took


def run(ctx: Context) -> list[Result]:
    if shutil.which("aria2c") is None:
        raise RuntimeError("aria2c is not installed (.ci/setup installs it)")
    size = 256 * MIB if ctx.quick else 1024 * MIB
    runs = 2 if ctx.quick else 3
    lab = podman_lab(ctx)
    folder = ctx.folder("once_model")
    origin = SignedOrigin(folder / "origin")
    (file,) = serve_model_files(folder / "mirror", {"model.safetensors": size}, seed="once")
    nginx = start_nginx(folder / "mirror", folder / "nginx", limit_rate=CAP)
    if nginx is None:
        origin.close()
        raise RuntimeError("nginx is not installed (.ci/setup installs nginx-light)")
    url = nginx.url + file.url
    entry = model_entry("big", "v1", [file])
    entry["files"][0]["urls"] = [url]
    home = folder / "node"
    blob = home / "state" / "models" / "blobs" / "sha256" / file.digest.removeprefix("sha256:")
    try:
        origin.publish(snapshot_body(models=[entry]))
        samples = interleaved(
            {
                "reconcile once": lambda: _once(home, origin, lab.service.url, blob),
                "aria2c": lambda: aria2_one_file(url, folder / "aria2"),
            },
            runs=runs,
        )
    finally:
        nginx.close()
        origin.close()
        shutil.rmtree(folder, ignore_errors=True)
    product, peer = median(samples["reconcile once"]), median(samples["aria2c"])
    details: dict[str, Any] = {
        "bytes": size,
        "limit_rate": CAP,
        "median_s": {"reconcile_once": round(product, 3), "aria2c+sha256sum": round(peer, 3)},
        "product_MB_per_s": round(size / product / 1e6, 1),
        "runs": runs,
        "load_1m": load_average(),
    }
    return [
        Result(
            name="once_model.vs_aria2",
            value=product / peer,
            unit="x",
            target=Target(1.0),
            baseline=Baseline(ARIA2_ONE_FILE, peer, "s"),
            details=details,
        )
    ]
