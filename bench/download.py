"""download: install a 1 GiB single-file model from a loopback origin, against curl.

The product side is a whole process (``python -m bench.model_install``): interpreter start,
imports, ``ModelStore.ensure`` — download, SHA-256 while receiving, write, fsync, rename, tree.
Every run starts from an empty node folder. The origin is nginx when it is installed (else the
test suite's ``FileServer``, which is slower than any client here). Two baselines, timed in the
same interleaved rounds:

* ``curl -s URL | sha256sum`` — the brief's baseline. On this machine coreutils' sha256sum
  hashes at about 150 MB/s (no SHA extensions), so this baseline is slow and flatters us;
* ``curl -s URL | tee FILE | openssl dgst -sha256; sync FILE`` — the same work as the product
  (receive, hash with OpenSSL, write, flush to disk), done by stock tools: the honest floor.

Both figures carry the ≤ 1.25x target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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

NAME = "download"


def _product(state: Path, origin_url: str, models_file: Path, ensure_s: list[float]) -> float:
    shutil.rmtree(state, ignore_errors=True)
    elapsed, _code, printed = install(state, origin_url, models_file)
    ensure_s.append(printed["ensure_s"])
    return elapsed


def _shell(script: str) -> float:
    return timed(["bash", "-c", "set -o pipefail; " + script])


def run(ctx: Context) -> list[Result]:
    size = 256 * MIB if ctx.quick else 1024 * MIB
    runs = 2 if ctx.quick else 3
    folder = ctx.folder("download")
    origin_root = folder / "origin"
    files = serve_model_files(origin_root, {"model.safetensors": size}, seed="download")
    models_file = folder / "models.json"
    models_file.write_text(json.dumps([model_entry("big", "v1", files)]), encoding="utf-8")
    nginx = start_nginx(origin_root, folder / "nginx")
    fileserver = None
    if nginx is not None:
        server_url = nginx.url
    else:
        fileserver = FileServer(origin_root).start()
        server_url = fileserver.url
    url = server_url + files[0].url
    copy = folder / "copy.bin"
    ensure_s: list[float] = []
    try:
        samples = interleaved(
            {
                "product": lambda: _product(folder / "node", server_url, models_file, ensure_s),
                "curl|sha256sum": lambda: _shell(f"curl -sf {url} | sha256sum >/dev/null"),
                "curl|tee|openssl+sync": lambda: _shell(
                    f"rm -f {copy}; curl -sf {url} | tee {copy} | openssl dgst -sha256 "
                    f">/dev/null && sync {copy}"
                ),
            },
            runs=runs,
        )
    finally:
        if nginx is not None:
            nginx.close()
        if fileserver is not None:
            fileserver.close()
        shutil.rmtree(folder, ignore_errors=True)
    product = median(samples["product"])
    coreutils = median(samples["curl|sha256sum"])
    like = median(samples["curl|tee|openssl+sync"])
    details = {
        "bytes": size,
        "origin": "nginx" if nginx is not None else "tests.support FileServer",
        "median_s": {
            "product_process": round(product, 3),
            "product_ensure_only": round(median(ensure_s[-runs:]), 3),
            "curl|sha256sum": round(coreutils, 3),
            "curl|tee|openssl+sync": round(like, 3),
        },
        "product_MB_per_s": round(size / product / 1e6, 1),
        "runs": runs,
        "load_1m": load_average(),
    }
    return [
        Result(
            name="download.vs_curl_sha256sum",
            value=product / coreutils,
            unit="x",
            target=Target(1.25),
            baseline=Baseline("curl -s URL | sha256sum", coreutils, "s"),
            details=details,
        ),
        Result(
            name="download.vs_same_work",
            value=product / like,
            unit="x",
            target=Target(1.25),
            baseline=Baseline("curl | tee FILE | openssl dgst; sync FILE", like, "s"),
            details=details,
        ),
    ]
