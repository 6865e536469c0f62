"""Sending the node's report to the collector (docs/contract.md §9).

Edge module (HTTP with httpx). ``deliver`` builds the report (``report.node_report``), PUTs
it with bounded time and size, logs one line when it fails, and records the result
(``report.deliveries``), which ``status`` and the metrics read. It never raises for a
collector that fails, hangs or redirects, and httpx's exceptions stay here: a report that
cannot be sent changes nothing else on the node. When to send (heartbeat, backoff) is the
caller's business (``agent.heartbeat``).
"""

from __future__ import annotations

import logging
import time

import httpx

from reconciler import __version__
from reconciler.core.documents import format_time
from reconciler.core.errors import ReconcilerError
from reconciler.history.node import Node
from reconciler.report.deliveries import Delivery, record_delivery
from reconciler.report.node_report import report_url, sealed_report

__all__ = ["PUT_DEADLINE_S", "deliver", "put_report"]

log = logging.getLogger("reconciler")

PUT_DEADLINE_S = 10.0  # the whole PUT: connect, send, answer
_ANSWER_BYTES = 4096  # what is read of the collector's answer body (it is thrown away)


def put_report(url: str, body: bytes, *, deadline_s: float = PUT_DEADLINE_S) -> Delivery:
    """PUT ``body`` to ``url``; redirects are not followed (a PUT body is not re-sent)."""
    started = time.monotonic()
    at = format_time(time.time())
    step = deadline_s / 3  # connect, send and wait for the answer: a third each at most
    headers = {"Content-Type": "application/json", "User-Agent": f"reconciler/{__version__}"}
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(step), follow_redirects=False) as client,
            client.stream("PUT", url, content=body, headers=headers) as response,
        ):
            _drain(response, started=started, deadline_s=deadline_s)
    except httpx.TimeoutException as exc:
        return Delivery(at, url, False, None, f"timed out ({type(exc).__name__})")
    except (httpx.HTTPError, _DeadlineError) as exc:
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return Delivery(at, url, False, None, message)
    status = response.status_code
    text = f"{status} {response.reason_phrase}".strip()
    if 200 <= status < 300:
        return Delivery(at, url, True, status, text)
    if response.is_redirect:
        text += f" to {response.headers.get('location', '?')[:200]} (not followed)"
    return Delivery(at, url, False, status, text)


class _DeadlineError(Exception):
    pass


def _drain(response: httpx.Response, *, started: float, deadline_s: float) -> None:
    """Read a little of the answer (so the connection ends cleanly), within the deadline."""
    read = 0
    for chunk in response.iter_raw(1024):
        read += len(chunk)
        if time.monotonic() - started > deadline_s:
            raise _DeadlineError(f"answer not received within {deadline_s:g} s")
        if read >= _ANSWER_BYTES:
            break


def deliver(node: Node, *, now: float | None = None) -> Delivery | None:
    """Build, sign, PUT and record one report; None when this node has no report URL."""
    try:
        url = report_url(node)
        if url is None:
            return None
        body = sealed_report(node, now=now)
    except ReconcilerError as exc:
        log.warning("report: not built: %s", exc.one_line())
        return None
    delivery = put_report(url, body)
    if not delivery.ok:
        log.warning("report: PUT %s failed: %s", url, delivery.message)
    record_delivery(node.paths.state_dir, delivery)
    return delivery
