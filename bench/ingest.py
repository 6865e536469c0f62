"""ingest: fetch + verify + commit of one new snapshot, with 10 vs 10,000 snapshots of history.

Two nodes trust the same origin. One has 10 snapshots in its state repository, the other
10,000 (1,000 with --quick), stored with ``History.store`` exactly as intake stores them
(pre-signed by the simulator; libgit2's fsync is switched off while the history is built and
on again before anything is timed). Then, round after round, the origin publishes one new
snapshot and each node runs the real ``intake.fetch`` against it over loopback HTTP (root walk,
head, snapshot, verification, commit, checkout, node record). The figure is the ratio of the
median fetch times, large history over small.
"""

from __future__ import annotations

import time

import pygit2

from bench.harness import Baseline, Context, Result, Target, load_average, median
from bench.network import BenchNode, SignedOrigin, snapshot_body
from reconciler.core.documents import format_time
from reconciler.core.record import AcceptedHead, fetch_succeeded
from reconciler.history.repo import StoredSnapshot
from reconciler.intake.fetch import fetch
from tests.support.signing import Release

NAME = "ingest"


def _store_history(bench_node: BenchNode, releases: list[Release], keyid: str) -> None:
    node = bench_node.node()
    history = node.history
    pygit2.settings.enable_fsync_gitdir(False)
    try:
        for release in releases:
            history.store(
                StoredSnapshot(
                    digest=release.digest,
                    serial=release.serial,
                    network=node.network,
                    root_version=1,
                    signed_by=(keyid,),
                    payload=release.snapshot_payload,
                    envelope=release.snapshot,
                ),
                advance=True,
            )
    finally:
        pygit2.settings.enable_fsync_gitdir(True)
    last = releases[-1]
    # What intake would have recorded after accepting the last of them (the head's expiry
    # and ETag do not matter here: the timed fetch replaces them).
    accepted = AcceptedHead(
        serial=last.serial,
        digest=last.digest,
        expires=format_time(time.time() + 3600),
        etag=None,
        new_head=history.head_oid(),
        waiting=False,
    )
    node.save(fetch_succeeded(node.state, at=format_time(time.time()), head=accepted))


def _fetch_once(bench_node: BenchNode) -> float:
    started = time.perf_counter()
    result = fetch(bench_node.node())
    elapsed = time.perf_counter() - started
    if result.status != "new":
        raise RuntimeError(f"ingest: expected a new HEAD, got {result.message}")
    return elapsed


def run(ctx: Context) -> list[Result]:
    small, large = 10, 1_000 if ctx.quick else 10_000
    rounds = 5 if ctx.quick else 15
    folder = ctx.folder("ingest")
    origin = SignedOrigin(folder / "origin")
    try:
        body = snapshot_body()
        simulator = origin.simulator
        keyid = simulator.keyid("k1")
        releases = [simulator.release(serial, body=body) for serial in range(1, large + 1)]
        few = BenchNode(folder / "few").init(origin.url, origin.root_envelope)
        many = BenchNode(folder / "many").init(origin.url, origin.root_envelope)
        started = time.monotonic()
        _store_history(few, releases[:small], keyid)
        _store_history(many, releases, keyid)
        build_s = time.monotonic() - started

        samples: dict[str, list[float]] = {"few": [], "many": []}
        serial = large
        for round_no in range(rounds + 1):  # round 0 warms up (schemas, pyc, connections)
            serial += 1
            origin.publish(body, serial=serial)
            order = [("few", few), ("many", many)]
            if round_no % 2:
                order.reverse()
            for label, node in order:
                seconds = _fetch_once(node)
                if round_no:
                    samples[label].append(seconds)
    finally:
        origin.close()
    few_ms = median(samples["few"]) * 1000
    many_ms = median(samples["many"]) * 1000
    return [
        Result(
            name="ingest.history_ratio",
            value=many_ms / few_ms,
            unit="x",
            target=Target(1.2),
            baseline=Baseline(f"fetch with {small} snapshots of history", few_ms, "ms"),
            details={
                "history_sizes": [small, large],
                "median_ms": {"few": round(few_ms, 2), "many": round(many_ms, 2)},
                "samples_ms": {k: [round(s * 1000, 2) for s in v] for k, v in samples.items()},
                "history_build_s": round(build_s, 1),
                "load_1m": load_average(),
            },
        )
    ]
