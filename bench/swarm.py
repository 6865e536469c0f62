"""swarm: six nodes start ``reconcile watch`` together and install the same 1 GiB model from
one web seed capped at 32 MB/s per request; what the web seed served, and how long the last
node took against one node alone (issue 14).

Each node is a real node folder (``reconcile init``), its own ``watch`` process, its own
libtorrent port on 127.0.0.1, the five others named in ``p2p_peers`` (with LSD off, so that
the figures measure the swarm, not how fast discovery is). Documents come from the signed
``FileServer`` origin;
the model file only from the web seed: nginx with ``limit_rate 32m`` and a small socket send
buffer. nginx caps each *request*, and a web seed (BEP 19) makes many short Range requests,
each of which would otherwise start with a burst as large as the kernel's send buffer, far
above the cap. The snapshot carries the file's piece hashes (``publish --bt``'s code). One
shared Podman service answers every node (the snapshot has no runtime). ``--quick``: 256 MiB.

Figures: ``swarm.web_seed_share`` = web seed body bytes / model size (target ≤ 1.5x) and
``swarm.last_over_alone`` = time until the sixth node converged / time one node alone took,
each from the moment its ``watch`` started (target ≤ 2x).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.converged import podman_lab
from bench.harness import MIB, Baseline, Context, Result, Target, load_average
from bench.network import BenchNode, SignedOrigin, model_entry, serve_model_files, snapshot_body
from bench.nginx_origin import NginxOrigin, launch_nginx
from reconciler.network.torrents import with_torrents
from tests.support.podman_fixtures import free_port

__all__ = ["run", "start_web_seed"]

NAME = "swarm"
NODES = 6
LIMIT_RATE = "32m"

# nginx caps each request; sndbuf keeps a short Range request from opening with a burst.
_WEB_SEED = """  access_log {prefix}/access.log sent;
  sendfile on;
  sendfile_max_chunk 256k;
  keepalive_requests 100000;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port} sndbuf=128k; root {root}; limit_rate {limit_rate}; }}"""


def start_web_seed(root: Path, prefix: Path, *, limit_rate: str) -> NginxOrigin | None:
    """nginx serving ``root`` with every request capped at ``limit_rate`` (nginx syntax) and
    its body bytes logged; None when nginx is not installed."""
    port = free_port()
    http = _WEB_SEED.format(prefix=prefix, port=port, root=root, limit_rate=limit_rate)
    process = launch_nginx(prefix, port=port, http=http)
    return None if process is None else NginxOrigin(process, port, root, prefix)


def _snapshot(origin: SignedOrigin, seed_url: str, size: int) -> dict[str, Any]:
    files = serve_model_files(origin.root, {"model.safetensors": size}, seed="swarm")
    entry = model_entry("big", "v1", files)
    entry["files"][0]["urls"] = [seed_url + files[0].url]
    body = snapshot_body(models=[entry], ttl={"poll_s": 1, "retry_min_s": 1, "retry_max_s": 2})
    document, filled = with_torrents(body, origin.root / "files" / "swarm")
    if filled.filled != 1:
        raise RuntimeError(f"the model file did not get piece hashes: {filled}")
    return document


def _nodes(folder: Path, origin: SignedOrigin, podman_url: str, count: int) -> list[BenchNode]:
    ports = [free_port() for _ in range(count)]
    nodes = []
    for i, port in enumerate(ports):
        peers = [f"127.0.0.1:{p}" for p in ports if p != port]
        nodes.append(
            BenchNode(folder / f"node{i}").init(
                origin.url,
                origin.root_envelope,
                podman_url=podman_url,
                disk_reserve_bytes=0,
                p2p=True,
                p2p_listen=f"127.0.0.1:{port}",
                p2p_peers=peers,
                p2p_lsd=False,
                p2p_dht=False,
            )
        )
    return nodes


def _converged(node: BenchNode, digest: str) -> bool:
    try:
        record = json.loads((node.state_dir / "node-state.json").read_bytes())
    except (OSError, ValueError):
        return False
    return bool(record.get("converged")) and record.get("applied_digest") == digest


def _watch_together(nodes: list[BenchNode], digest: str, *, limit_s: float) -> list[float]:
    """Start every node's ``watch`` at once; seconds until each converged (then stop all)."""
    logs = [(n.home / "watch.log").open("wb") for n in nodes]
    started = time.monotonic()
    processes = [
        subprocess.Popen(n.argv("watch"), env=n.env(), stdout=log, stderr=log)
        for n, log in zip(nodes, logs, strict=True)
    ]
    done: dict[int, float] = {}
    try:
        while len(done) < len(nodes):
            if time.monotonic() - started > limit_s:
                raise RuntimeError(f"only {len(done)} of {len(nodes)} nodes converged")
            for i, node in enumerate(nodes):
                if i not in done and _converged(node, digest):
                    done[i] = time.monotonic() - started
            time.sleep(0.1)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    return [done[i] for i in range(len(nodes))]


def run(ctx: Context) -> list[Result]:
    size = 256 * MIB if ctx.quick else 1024 * MIB
    folder = ctx.folder(NAME)
    lab = podman_lab(ctx)
    origin = SignedOrigin(folder / "origin")
    seed = start_web_seed(origin.root, folder / "nginx", limit_rate=LIMIT_RATE)
    if seed is None:
        origin.close()
        raise RuntimeError("nginx is not installed (.ci/setup installs it)")
    try:
        release = origin.publish(_snapshot(origin, seed.url, size))
        alone = _nodes(folder / "alone", origin, lab.service.url, 1)
        seed.reset_log()
        alone_s = _watch_together(alone, release.digest, limit_s=600)[0]
        alone_served = seed.body_bytes_sent()
        nodes = _nodes(folder / "swarm", origin, lab.service.url, NODES)
        seed.reset_log()
        times = _watch_together(nodes, release.digest, limit_s=900)
        served = seed.body_bytes_sent()
    finally:
        seed.close()
        origin.close()
    details = {
        "bytes": size,
        "nodes": NODES,
        "limit_rate": LIMIT_RATE,
        "web_seed_bytes": served,
        "converged_s": [round(t, 2) for t in times],
        "alone_s": round(alone_s, 2),
        "alone_web_seed_bytes": alone_served,
        "load_1m": load_average(),
    }
    return [
        Result(
            name="swarm.web_seed_share",
            value=round(served / size, 4),
            unit="x",
            target=Target(1.5),
            baseline=Baseline(label="the model's size", value=size / MIB, unit="MiB"),
            details=details,
        ),
        Result(
            name="swarm.last_over_alone",
            value=round(max(times) / alone_s, 4),
            unit="x",
            target=Target(2.0),
            baseline=Baseline(
                label="one node alone, same web seed", value=round(alone_s, 2), unit="s"
            ),
            details=details,
        ),
    ]
