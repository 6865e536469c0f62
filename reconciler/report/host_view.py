"""The node's GPUs, CDI specs, held runtimes and participation, as the last pass recorded them.

Where it sits: ``status``, the metrics and the node report read it; the apply wrote the two
files it reads (``<state>/gpus.json`` by ``apply.steps.write_host_facts`` every pass, and
``runtime/participation.json`` with the runtime files). It never calls NVML or reads the CDI
folders itself: ``status`` must answer at once, also on a node whose driver is wedged.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.core.gpus import GpuFacts
from reconciler.history.node import Node
from reconciler.report.metrics import Metric

__all__ = ["format_host_lines", "gpu_metrics", "host_view", "report_gpus"]


def _read_json(node: Node, *parts: str) -> dict[str, Any] | None:
    path = node.paths.state_dir.joinpath(*parts)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _gpus(node: Node, recorded: dict[str, Any] | None) -> GpuFacts:
    """The recorded facts; before any pass, only the operator's ``vram_mib`` (or none)."""
    if recorded is not None:
        try:
            return GpuFacts.from_json(recorded.get("gpus") or {})
        except ValueError:
            pass
    vram = node.settings.vram_mib
    if vram is not None:
        return GpuFacts(source="setting", vram_mib=vram)
    return GpuFacts(source="none", note="not read yet: no converge pass has run")


def host_view(node: Node) -> dict[str, Any]:
    """``gpus``, ``cdi``, ``held`` and ``participation`` of ``status --json``."""
    recorded = _read_json(node, "gpus.json")
    part = _read_json(node, "runtime", "participation.json")
    return {
        "gpus": _gpus(node, recorded).to_json(),
        "cdi": (recorded or {}).get("cdi"),
        "held": list((recorded or {}).get("held") or []),
        "participation": None
        if part is None
        else {
            "subclouds": part.get("subclouds", []),
            "excluded": part.get("excluded", []),
            "excluded_for_vram": part.get("excluded_for_vram", []),
        },
    }


def report_gpus(node: Node) -> dict[str, Any]:
    """The node report's ``gpus`` (docs/contract.md §9): ``{source, devices, vram_mib}``."""
    facts = host_view(node)["gpus"]
    return {key: facts[key] for key in ("source", "devices", "vram_mib")}


def format_host_lines(view: dict[str, Any]) -> list[str]:
    """The lines ``reconcile status`` prints for the GPUs, CDI specs, holds and exclusions."""
    facts = GpuFacts.from_json(view["gpus"])
    lines = [f"gpus        {facts.summary()}"]
    lines += [f"gpu {d.index:<7} {d.name}  {d.memory_mib} MiB  {d.uuid}" for d in facts.devices]
    cdi = view.get("cdi")
    if cdi and (cdi.get("specs") or cdi.get("invalid")):
        kinds = sorted({s["kind"] for s in cdi.get("specs", [])})
        lines.append(
            f"cdi         {len(cdi.get('specs', []))} spec(s) in {', '.join(cdi.get('dirs', []))}"
            + (f": {', '.join(kinds)}" if kinds else "")
        )
        lines += [f"cdi         INVALID {i['path']}: {i['why']}" for i in cdi.get("invalid", [])]
    lines += [f"held        runtime {h['runtime']}: {h['why']}" for h in view["held"]]
    part = view.get("participation") or {}
    lines += [f"excluded    subcloud {e['id']}: {e['why']}" for e in part.get("excluded", [])]
    return lines


def gpu_metrics(node: Node) -> list[Metric]:
    """The GPU facts, held runtimes and VRAM exclusions as gauges (docs/status.md)."""
    view = host_view(node)
    facts = GpuFacts.from_json(view["gpus"])
    part = view["participation"] or {}
    cdi = view["cdi"] or {}
    metrics = [
        Metric(
            "reconciler_gpus_info",
            "Where the node's VRAM figure comes from (nvml, setting, none).",
            "gauge",
            1,
            labels=(("source", facts.source), ("driver", facts.driver or "")),
        ),
        Metric("reconciler_gpu_count", "GPUs NVML lists.", "gauge", len(facts.devices)),
        Metric(
            "reconciler_gpu_vram_mib",
            "The VRAM participation uses: the largest single GPU or the setting (-1: none).",
            "gauge",
            facts.vram_mib if facts.vram_mib is not None else -1,
        ),
        Metric(
            "reconciler_runtimes_held",
            "Runtimes not created: a CDI device they ask for is not defined on the node.",
            "gauge",
            len(view["held"]),
        ),
        Metric(
            "reconciler_subclouds_excluded_vram",
            "Enabled subclouds the node left out because of VRAM alone.",
            "gauge",
            len(part.get("excluded_for_vram", [])),
        ),
        Metric(
            "reconciler_cdi_specs_invalid",
            "CDI spec files that could not be used.",
            "gauge",
            len(cdi.get("invalid", [])),
        ),
    ]
    metrics.extend(
        Metric(
            "reconciler_gpu_memory_mib",
            "Memory of one GPU.",
            "gauge",
            d.memory_mib,
            labels=(("index", str(d.index)), ("name", d.name)),
        )
        for d in facts.devices
    )
    return metrics
