"""Prometheus text-format metrics for node_exporter's textfile collector.

Pure rendering plus one atomic write: node_exporter must never read half a file, so the file
is replaced with rename. Written after every pass when the ``metrics_path`` setting names it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler.disk.atomic import write_atomic

__all__ = ["Metric", "render", "write_metrics"]


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    kind: str  # gauge | counter
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for metric in metrics:
        if metric.name not in seen:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            seen.add(metric.name)
        labels = ""
        if metric.labels:
            labels = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in metric.labels) + "}"
        value = int(metric.value) if float(metric.value).is_integer() else metric.value
        lines.append(f"{metric.name}{labels} {value}")
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, metrics: Iterable[Metric]) -> None:
    write_atomic(path, render(metrics).encode("utf-8"))
