"""poll cost: the bytes of one poll when nothing changed, counted on the wire.

A node polls with the real ``intake.fetch`` through a counting TCP relay: ``root/N+1.json``
(answered 404: no new root) and ``head.json`` with ``If-None-Match`` (answered 304). Every byte
of HTTP both ways is counted, headers included (TCP/IP framing is not). Measured against the
test suite's ``FileServer`` and, when installed, against nginx serving the same folder — a
stock origin's 404 page and headers are part of what a poll costs. Target ≤ 1 KiB per poll.
"""

from __future__ import annotations

import shutil
import time

from bench.harness import Context, Result, Target, load_average, median
from bench.network import BenchNode, SignedOrigin, snapshot_body
from bench.nginx_origin import start_nginx
from bench.wire import CountingRelay
from reconciler.intake.fetch import fetch

NAME = "poll_cost"
POLLS = 5


def _first_lines(captured: list[tuple[str, bytes]]) -> list[str]:
    """The request and status lines seen, in order (what a poll consists of)."""
    lines = []
    for direction, data in captured:
        head = data.split(b"\r\n", 1)[0].decode("latin-1")
        if head.startswith(("GET ", "HTTP/")):
            lines.append(f"{'>' if direction == 'up' else '<'} {head}")
    return lines


def _measure(ctx: Context, label: str, port: int, origin: SignedOrigin) -> Result:
    relay = CountingRelay(port)
    try:
        node = BenchNode(ctx.folder(f"poll_cost/{label}")).init(relay.url, origin.root_envelope)
        fetch(node.node())  # takes the snapshot; the polls below find nothing new
        totals, sent, received, exchanges = [], [], [], []
        for _ in range(POLLS):
            relay.reset()
            result = fetch(node.node())
            time.sleep(0.05)  # the relay's threads count before they forward; let them finish
            if result.status != "current" or "not modified" not in result.message:
                raise RuntimeError(f"poll_cost: expected a 304 poll, got {result.message}")
            totals.append(relay.sent + relay.received)
            sent.append(relay.sent)
            received.append(relay.received)
            exchanges = _first_lines(relay.captured)
        request = next(data for d, data in relay.captured if d == "up").decode("latin-1")
    finally:
        relay.close()
    return Result(
        name=f"poll_cost.{label}",
        value=median(totals),
        unit="B",
        target=Target(1024),
        details={
            "client_sent_B": median(sent),
            "client_received_B": median(received),
            "exchanges": exchanges,
            "first_request": request,
            "polls": POLLS,
            "load_1m": load_average(),
        },
    )


def run(ctx: Context) -> list[Result]:
    folder = ctx.folder("poll_cost")
    origin = SignedOrigin(folder / "origin")
    nginx = None
    try:
        origin.publish(snapshot_body())
        results = [_measure(ctx, "fileserver", origin.server.port, origin)]
        nginx = start_nginx(origin.root, folder / "nginx")
        if nginx is not None:
            results.append(_measure(ctx, "nginx", nginx.port, origin))
    finally:
        if nginx is not None:
            nginx.close()
        origin.close()
        shutil.rmtree(folder, ignore_errors=True)
    return results
