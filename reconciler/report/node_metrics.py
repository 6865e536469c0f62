"""Metrics for node_exporter's textfile collector, from what the node recorded.

Edge module (reads the node record, the model store's index and its figures per mirror;
writes one file when the ``metrics_path`` setting names it, or records in the node record
that strict modes refused its folder). Names are stable: dashboards and alerts depend on them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from reconciler import __version__
from reconciler.core.documents import format_time, parse_time
from reconciler.core.errors import UntrustedPathError
from reconciler.core.record import NodeState, refusal_cleared, refusal_noted
from reconciler.core.rollout import RolloutWait
from reconciler.history.node import Node
from reconciler.models.layout import StoreLayout
from reconciler.models.mirrors import read_mirror_totals
from reconciler.report.deliveries import read_deliveries
from reconciler.report.host_view import gpu_metrics
from reconciler.report.metrics import Metric, write_metrics
from reconciler.selfupdate.gate import running_release

__all__ = ["node_metrics", "write_node_metrics"]

log = logging.getLogger("reconciler")


def _blob_bytes(node: Node) -> int:
    """Bytes of verified model blobs on disk (``models/blobs/sha256/``; one stat per blob)."""
    total = 0
    try:
        entries = list(os.scandir(node.paths.models / "blobs" / "sha256"))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def node_metrics(
    node: Node, *, last_apply_s: float | None, now: float | None = None
) -> list[Metric]:
    now = time.time() if now is None else now
    metrics = [
        *_record_metrics(node.state, now=now),
        *_counter_metrics(node.state),
        *_report_metrics(node),
        *_mirror_metrics(node),
        *_rollout_metrics(node.state, now=now),
        *gpu_metrics(node),
        _agent_metric(),
        Metric(
            "reconciler_model_bytes_installed",
            "Bytes of model blobs on disk.",
            "gauge",
            _blob_bytes(node),
        ),
    ]
    metrics.extend(
        Metric(
            "reconciler_quarantined",
            "A quarantined snapshot digest.",
            "gauge",
            1,
            labels=(("digest", digest),),
        )
        for digest in node.state.quarantined
    )
    if last_apply_s is not None:
        metrics.append(
            Metric(
                "reconciler_last_apply_duration_seconds",
                "Wall time of the last pass.",
                "gauge",
                round(last_apply_s, 3),
            )
        )
    return metrics


def _record_metrics(state: NodeState, *, now: float) -> list[Metric]:
    """The gauges read from the node record: what is applied, held, stale, quarantined."""
    since_fetch = now - parse_time(state.last_fetch_ok_at) if state.last_fetch_ok_at else -1
    stale = bool(state.last_head_expires and parse_time(state.last_head_expires) <= now)
    return [
        Metric(
            "reconciler_applied_serial",
            "Serial of the last converged snapshot.",
            "gauge",
            state.applied_serial or 0,
        ),
        Metric(
            "reconciler_converged",
            "1 when the node matches HEAD.",
            "gauge",
            1 if state.converged else 0,
        ),
        Metric(
            "reconciler_seconds_since_last_fetch",
            "Seconds since the last successful fetch (-1: never).",
            "gauge",
            round(since_fetch, 3),
        ),
        Metric(
            "reconciler_stale",
            "1 when the last accepted head has expired.",
            "gauge",
            1 if stale else 0,
        ),
        Metric(
            "reconciler_hold", "1 while automatic advance is held.", "gauge", 1 if state.hold else 0
        ),
        Metric(
            "reconciler_quarantined_snapshots",
            "Digests quarantined after a failed apply.",
            "gauge",
            len(state.quarantined),
        ),
    ]


def _counter_metrics(state: NodeState) -> list[Metric]:
    """The record's counters (docs/status.md), as Prometheus counters."""
    return [
        Metric(
            "reconciler_apply_failures_total",
            "Apply attempts that failed.",
            "counter",
            state.counters.get("apply_failures", 0),
        ),
        Metric(
            "reconciler_rollbacks_total",
            "Automatic and manual rollbacks.",
            "counter",
            state.counters.get("rollbacks", 0),
        ),
        Metric(
            "reconciler_fetch_rejections_total",
            "Documents rejected at intake.",
            "counter",
            state.counters.get("rejections", 0),
        ),
    ]


def _agent_metric() -> Metric:
    """The agent that writes these metrics: its version, and its release digest (§10)."""
    release = running_release()
    return Metric(
        "reconciler_agent_info",
        "The running agent: version, and the release digest (empty: the base install).",
        "gauge",
        1,
        labels=(("version", __version__), ("release", f"sha256:{release}" if release else "")),
    )


def _report_metrics(node: Node) -> list[Metric]:
    """Reports sent to the collector (docs/contract.md §9), accepted or not."""
    record = read_deliveries(node.paths.state_dir)
    return [
        Metric(
            "reconciler_reports_total",
            "Reports PUT to the collector, by result.",
            "counter",
            count,
            labels=(("result", result),),
        )
        for result, count in (("ok", record.sent), ("failed", record.failed))
    ]


def _mirror_metrics(node: Node) -> list[Metric]:
    """Bytes received from and failed requests of each mirror host, over every fetch (the
    model store records them in ``models/.mirrors.json`` at the end of each)."""
    totals = read_mirror_totals(StoreLayout.of(node.paths).mirrors_path)
    hosts = sorted(totals.received.keys() | totals.errors.keys())
    return [
        *(
            Metric(
                "reconciler_mirror_bytes_total",
                "Model file bytes received from a mirror host.",
                "counter",
                totals.received.get(host, 0),
                labels=(("mirror", host),),
            )
            for host in hosts
        ),
        *(
            Metric(
                "reconciler_mirror_errors_total",
                "Failed requests to a mirror host (errors, stalls, wrong bytes).",
                "counter",
                totals.errors.get(host, 0),
                labels=(("mirror", host),),
            )
            for host in hosts
        ),
    ]


def _rollout_metrics(state: NodeState, *, now: float) -> list[Metric]:
    """Where this node stands in a rollout (docs/contract.md §8): waiting, or entered."""
    wait = RolloutWait.from_record(state.rollout_wait)
    out_of_wave = wait is not None and wait.admission(now) is None
    metrics = [
        Metric(
            "reconciler_rollout_waiting",
            "1 while a stored snapshot waits for this node's rollout wave.",
            "gauge",
            1 if out_of_wave else 0,
        )
    ]
    if wait is not None:
        found = wait.entry()
        metrics.append(
            Metric(
                "reconciler_rollout_enters_timestamp_seconds",
                "When the wave that lets this node take the waiting snapshot opens (-1: none).",
                "gauge",
                found.at if found is not None else -1,
            )
        )
    entered = state.rollout_entered
    position = str(wait.position) if wait is not None else (entered or {}).get("position")
    if position is not None:
        metrics.append(
            Metric(
                "reconciler_rollout_position_percent",
                "This node's position in the rollout it waits for, or last entered.",
                "gauge",
                float(position),
            )
        )
    if entered:
        metrics.extend(
            [
                Metric(
                    "reconciler_rollout_entered_wave",
                    "The wave through which HEAD last moved.",
                    "gauge",
                    entered["wave"],
                ),
                Metric(
                    "reconciler_rollout_entered_timestamp_seconds",
                    "When HEAD last moved through a rollout wave.",
                    "gauge",
                    parse_time(entered["at"]),
                ),
            ]
        )
    return metrics


def write_node_metrics(node: Node, *, last_apply_s: float | None) -> None:
    """Write the metrics file; a folder chain that strict modes refuse is one log line and
    ``metrics_refused`` in ``status`` instead, cleared by the next write that works."""
    state = node.state
    if not node.settings.metrics_path:
        if "metrics" in state.refused:  # the setting is gone, and its refusal with it
            node.save(refusal_cleared(state, what="metrics"))
        return
    path = Path(node.settings.metrics_path)
    try:
        write_metrics(path, node_metrics(node, last_apply_s=last_apply_s))
    except UntrustedPathError as exc:
        log.error("metrics file %s not written: %s", path, exc.one_line())
        state = refusal_noted(
            state, what="metrics", reason=exc.one_line(), at=format_time(time.time())
        )
    else:
        state = refusal_cleared(state, what="metrics")
    if state is not node.state:
        node.save(state)
