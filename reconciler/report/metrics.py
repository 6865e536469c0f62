"""Prometheus text-format metrics for node_exporter's textfile collector.

Pure rendering plus one atomic write: node_exporter must never read half a file, so the file
is replaced with rename. Written after every pass when the ``metrics_path`` setting names it.

Strict modes (``disk.strict``) hold its folder and every folder above it: the root agent does
not write into a folder that someone else could rename away and replace (with a symlink to a
folder of root's, say), nor one where another user could rewrite what monitoring reads. It
may not decide what a refusal means for the node: the caller records it for ``status``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler.disk.atomic import write_atomic
from reconciler.disk.strict import check_trusted

__all__ = ["Metric", "check_metrics_folder", "render", "write_metrics"]


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


def check_metrics_folder(path: Path) -> None:
    """Strict modes on the folder chain of the metrics file ``path``: ``UntrustedPathError``
    (one line, e.g. ``metrics folder /srv/prom is writable by others``) if it fails. A folder
    not there yet passes when what exists above it does (``write_metrics`` creates it, 0755
    root). No relaxed group: ``strict_modes_group`` is for the hooks only."""
    check_trusted(path.parent, what="metrics folder")


def write_metrics(path: Path, metrics: Iterable[Metric]) -> None:
    """Replace ``path`` with ``metrics``, once its folder chain passes strict modes."""
    check_metrics_folder(path)
    write_atomic(path, render(metrics).encode("utf-8"))
