"""``reconcile fleet DIR``: the network operator's view of a folder of node reports (§9).

Edge module (files, worker processes), on the network's side. It reads ``DIR/nodes/*.json``
as a collector stored them, checks every report with ``core.nodereport.check_report`` (name,
signature, size, strict JSON, type, time), and tallies the valid ones of one network as it
goes: applied snapshots, convergence, failures, holds, quarantines, silence, agent versions
and, for a head given, each rollout wave (``core.rollout``). An invalid report, or one of
another network, is listed apart with its reason and counted nowhere else.

Scale: reports are verified in a pool of worker processes (Ed25519 is most of the cost) and
streamed into the tally in name order, so memory holds one small ``ReportView`` per batch in
flight plus the lists the view prints, never the envelopes. It writes nothing.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from reconciler.core.documents import Head, format_time
from reconciler.core.errors import SettingsError
from reconciler.core.nodereport import (
    MAX_REPORT_BYTES,
    InvalidReportError,
    ReportView,
    check_report,
)
from reconciler.core.rollout import Rollout, Wave, entry, percent_now, position, salt_of

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "FleetView",
    "Rejected",
    "WaveRow",
    "describe",
    "read_fleet",
    "report_files",
]

DEFAULT_HEARTBEAT_S = 30  # the usual ttl.heartbeat_s; a node is stale after 3 of them
STALE_HEARTBEATS = 3
_BATCH = 256  # files per task handed to a worker
_POOL_FROM = 2000  # fewer files than this are checked in this process (no pool start-up)


@dataclass(frozen=True)
class Rejected:
    file: str
    why: str


def report_files(folder: Path) -> list[Path]:
    """The report files of ``folder`` (its ``nodes/`` subfolder if it has one), by name."""
    nodes = folder / "nodes"
    base = nodes if nodes.is_dir() else folder
    try:
        entries = list(os.scandir(base))
    except OSError as exc:
        raise SettingsError(f"cannot read {base}: {exc.strerror or exc}") from exc
    names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
    return [base / name for name in names]


def _check_file(path: Path, *, now: float) -> ReportView | Rejected:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        return Rejected(path.name, f"unreadable ({exc.strerror or exc})")
    try:
        return check_report(data, name=path.name, now=now)
    except InvalidReportError as exc:
        return Rejected(path.name, str(exc))


def _check_batch(paths: list[Path], *, now: float) -> list[ReportView | Rejected]:
    return [_check_file(path, now=now) for path in paths]


def _checked(paths: list[Path], *, now: float, workers: int) -> Iterator[ReportView | Rejected]:
    """Each file's verdict, in the order given; verified on ``workers`` processes."""
    batches = [paths[i : i + _BATCH] for i in range(0, len(paths), _BATCH)]
    task = partial(_check_batch, now=now)
    if workers <= 1 or len(paths) < _POOL_FROM:
        for batch in batches:
            yield from task(batch)
        return
    # fork: the workers need nothing but this module, and start in milliseconds.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for verdicts in pool.imap(task, batches, chunksize=1):
            yield from verdicts


@dataclass(frozen=True)
class WaveRow:
    """One rollout wave as ``fleet`` counts it (``wave`` 0: no wave reaches these nodes)."""

    wave: int
    at: int | None
    percent: int | None
    opened: bool
    nodes: int = 0
    converged: int = 0
    failed: int = 0
    silent: int = 0

    @property
    def due(self) -> int:
        return self.nodes if self.opened else 0

    @property
    def pending(self) -> int:
        return self.due - self.converged - self.failed - self.silent if self.opened else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "wave": self.wave,
            "at": format_time(self.at) if self.at is not None else None,
            "percent": self.percent,
            "opened": self.opened,
            "nodes": self.nodes,
            "due": self.due,
            "converged": self.converged,
            "failed": self.failed,
            "silent": self.silent,
            "pending": self.pending,
        }


@dataclass
class _Tally:
    """The counts of one network's valid reports, added to one report at a time."""

    now: float
    stale_after_s: float
    head: Head | None
    nodes: int = 0
    converged: int = 0
    applied: Counter[tuple[int, str] | None] = field(default_factory=Counter)
    heads: dict[int | None, list[int]] = field(default_factory=dict)  # serial → [conv, all]
    failing: list[dict[str, Any]] = field(default_factory=list)
    hold: list[str] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    stale: list[dict[str, Any]] = field(default_factory=list)
    agents: Counter[str] = field(default_factory=Counter)
    # wave → [nodes, converged, failed, silent]; wave 0: no wave reaches them
    waves: dict[int, list[int]] = field(default_factory=dict)

    @property
    def _salt(self) -> str:
        assert self.head is not None
        return salt_of(self.head.rollout, self.head.config_digest)

    @classmethod
    def start(cls, *, now: float, heartbeat_s: float, head: Head | None) -> _Tally:
        return cls(now=now, stale_after_s=STALE_HEARTBEATS * heartbeat_s, head=head)

    def add(self, view: ReportView) -> None:
        self.nodes += 1
        self.converged += view.converged
        self.applied[view.applied] += 1
        serial = view.head[0] if view.head else None
        counts = self.heads.setdefault(serial, [0, 0])
        counts[0] += view.converged
        counts[1] += 1
        self.agents[view.agent_version] += 1
        silent = self.now - view.at > self.stale_after_s
        if view.last_error is not None:
            self.failing.append(
                {"node": view.node, "last_error": view.last_error, "converged": view.converged}
            )
        if view.hold:
            self.hold.append(view.node)
        if view.quarantined:
            self.quarantine.append({"node": view.node, "quarantined": view.quarantined})
        if silent:
            self.stale.append({"node": view.node, "at": format_time(view.at)})
        if self.head is not None:
            self._add_to_wave(view, silent=silent)

    def _add_to_wave(self, view: ReportView, *, silent: bool) -> None:
        """Converged on the head's digest first (a node never leaves a snapshot it took),
        then silent (no recent report), then failed (an error and not there)."""
        head = self.head
        assert head is not None
        found = entry(_rollout_of(head), position(self._salt, view.public))
        counts = self.waves.setdefault(found.wave if found else 0, [0, 0, 0, 0])
        counts[0] += 1
        on_head = view.applied is not None and view.applied[1] == head.config_digest
        if view.converged and on_head:
            counts[1] += 1
        elif silent:
            counts[3] += 1
        elif view.last_error is not None:
            counts[2] += 1

    def wave_rows(self) -> list[WaveRow]:
        if self.head is None:
            return []
        rollout = _rollout_of(self.head)
        rows = []
        for number, wave in enumerate(rollout.waves, start=1):
            nodes, conv, failed, silent = self.waves.get(number, [0, 0, 0, 0])
            opened = wave.at <= self.now
            rows.append(WaveRow(number, wave.at, wave.percent, opened, nodes, conv, failed, silent))
        if 0 in self.waves:
            rows.append(WaveRow(0, None, None, False, self.waves[0][0]))
        return rows


def _rollout_of(head: Head) -> Rollout:
    """The head's rollout; a head without one lets every node in when it was issued (§8)."""
    return head.rollout or Rollout(waves=(Wave(at=head.issued_at, percent=100),))


@dataclass(frozen=True)
class FleetView:
    """What ``reconcile fleet`` shows; ``to_json`` is the ``--json`` object."""

    network: str | None
    now: int
    heartbeat_s: float
    files: int
    tally: _Tally
    invalid: tuple[Rejected, ...]
    other_network: tuple[dict[str, str], ...]

    def converged_percent(self) -> float:
        return round(100 * self.tally.converged / self.tally.nodes, 2) if self.tally.nodes else 0.0

    def to_json(self) -> dict[str, Any]:
        tally, head = self.tally, self.tally.head
        return {
            "network": self.network,
            "now": format_time(self.now),
            "heartbeat_s": self.heartbeat_s,
            "stale_after_s": tally.stale_after_s,
            "reports": {
                "files": self.files,
                "valid": tally.nodes,
                "invalid": len(self.invalid),
                "other_network": len(self.other_network),
            },
            "nodes": tally.nodes,
            "converged": tally.converged,
            "converged_percent": self.converged_percent(),
            "applied": _applied_json(tally.applied),
            "heads": [
                {"serial": serial, "nodes": counts[1], "converged": counts[0]}
                for serial, counts in sorted(tally.heads.items(), key=_serial_key)
            ],
            "failing": tally.failing,
            "hold": tally.hold,
            "quarantine": tally.quarantine,
            "stale": tally.stale,
            "agent_versions": [{"version": v, "nodes": n} for v, n in sorted(tally.agents.items())],
            "rollout": _rollout_json(tally, head) if head is not None else None,
            "invalid": [{"file": r.file, "why": r.why} for r in self.invalid],
            "other_network": list(self.other_network),
        }


def describe(view: FleetView, *, limit: int = 20) -> list[str]:
    """The human form: counts first, then at most ``limit`` lines per list."""
    data, tally = view.to_json(), view.tally
    files = data["reports"]
    lines = [
        f"fleet       {view.network or '(no network)'} at {data['now']}: {files['files']} files, "
        f"{files['valid']} valid, {files['invalid']} invalid, "
        f"{files['other_network']} of another network",
        f"converged   {tally.converged} of {tally.nodes} nodes ({view.converged_percent():g} %)",
    ]
    lines += [
        f"applied     serial {row['serial']}  {row['config_digest']}  {row['nodes']} nodes"
        if row["serial"] is not None
        else f"applied     (nothing yet)  {row['nodes']} nodes"
        for row in data["applied"]
    ]
    lines += [
        f"agent       {row['version']}  {row['nodes']} nodes" for row in data["agent_versions"]
    ]
    if data["rollout"] is not None:
        lines += _rollout_lines(data["rollout"])
    lines += _listed(
        "failing", [f"{r['node'][:16]}  {r['last_error']}" for r in tally.failing], limit
    )
    lines += _listed("hold", [node[:16] for node in tally.hold], limit)
    lines += _listed(
        "quarantine",
        [f"{r['node'][:16]}  {r['quarantined']} digest(s)" for r in tally.quarantine],
        limit,
    )
    lines += _listed(
        "stale", [f"{r['node'][:16]}  last report {r['at']}" for r in tally.stale], limit
    )
    lines += _listed("invalid", [f"{r.file}: {r.why}" for r in view.invalid], limit)
    lines += _listed(
        "other net", [f"{r['node'][:16]}  {r['network']}" for r in view.other_network], limit
    )
    return lines


def _rollout_lines(rollout: dict[str, Any]) -> list[str]:
    lines = [
        f"rollout     serial {rollout['serial']}  {rollout['config_digest']}  "
        f"{rollout['percent_now']} % now"
    ]
    for row in rollout["waves"]:
        name = f"wave {row['wave']}" if row["wave"] else "no wave"
        when = f"{row['percent']} % at {row['at']}" if row["wave"] else "reaches them"
        lines.append(
            f"  {name:<8}  {when}  {row['nodes']} nodes, {row['due']} due, "
            f"{row['converged']} converged, {row['failed']} failed, {row['silent']} silent"
        )
    return lines


def _listed(label: str, items: list[str], limit: int) -> list[str]:
    shown = [f"{label:<11} {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"{label:<11} … and {len(items) - limit} more (--json lists all)")
    return shown


def _serial_key(item: tuple[int | None, Any]) -> tuple[int, int]:
    return (0, 0) if item[0] is None else (1, item[0])


def _applied_json(applied: Counter[tuple[int, str] | None]) -> list[dict[str, Any]]:
    rows = [
        {"serial": key[0] if key else None, "config_digest": key[1] if key else None, "nodes": n}
        for key, n in applied.items()
    ]
    return sorted(rows, key=lambda r: (r["serial"] is not None, r["serial"] or 0), reverse=True)


def _rollout_json(tally: _Tally, head: Head) -> dict[str, Any]:
    return {
        "serial": head.serial,
        "config_digest": head.config_digest,
        "percent_now": percent_now(head.rollout, tally.now),
        "waves": [row.to_json() for row in tally.wave_rows()],
    }


def read_fleet(
    folder: Path,
    *,
    now: float,
    network: str | None = None,
    head: Head | None = None,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    workers: int | None = None,
) -> FleetView:
    """Check and tally every report in ``folder``: those of ``network``, else of the head's,
    else of the network most reports name."""
    paths = report_files(folder)
    wanted = network or (head.network if head is not None else None)
    tallies: dict[str, _Tally] = {}
    members: dict[str, list[str]] = {}  # network → its nodes, for those listed apart
    invalid: list[Rejected] = []
    workers = workers if workers is not None else (os.cpu_count() or 1)
    for verdict in _checked(paths, now=now, workers=workers):
        if isinstance(verdict, Rejected):
            invalid.append(verdict)
            continue
        members.setdefault(verdict.network, []).append(verdict.node)
        if wanted is not None and verdict.network != wanted:
            continue
        if verdict.network not in tallies:
            tallies[verdict.network] = _Tally.start(now=now, heartbeat_s=heartbeat_s, head=head)
        tallies[verdict.network].add(verdict)
    chosen = wanted or max(sorted(members), key=lambda n: len(members[n]), default=None)
    others = tuple(
        {"node": node, "network": name}
        for name in sorted(members)
        if name != chosen
        for node in members[name]
    )
    empty = _Tally.start(now=now, heartbeat_s=heartbeat_s, head=head)
    return FleetView(
        network=chosen,
        now=int(now),
        heartbeat_s=heartbeat_s,
        files=len(paths),
        tally=tallies.get(chosen, empty) if chosen is not None else empty,
        invalid=tuple(invalid),
        other_network=others,
    )
