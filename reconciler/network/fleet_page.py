"""``reconcile fleet --html FILE``: the fleet view as one self-contained page.

Edge module (writes one file), on the network's side, below ``network.fleet``. The page has
no external asset: inline CSS, an inline SVG chart of convergence per HEAD serial drawn
here, the per-wave table, and a small inline script that re-counts the tables against the
embedded numbers and marks the page checked (``<html data-checked="ok">``), so a browser
test can tell that it ran. Everything a node wrote (errors, versions) is escaped, and the
Content-Security-Policy admits only this page's own style and its one script (by hash):
a node cannot put markup or script into the operator's browser.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Any

from reconciler.disk.atomic import write_atomic
from reconciler.network.fleet import FleetView

__all__ = ["render_page", "write_page"]

_LISTED = 200  # rows per list on the page; --json has them all

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d232b;background:#fafafa}
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d5d9de;padding:.2rem .55rem;text-align:right}
th:first-child,td:first-child{text-align:left}
code{font-size:12px}.muted{color:#67707a}.bad{color:#a61b1b}
.cards{display:flex;gap:.8rem;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d9de;border-radius:6px;padding:.5rem .9rem}
.card b{display:block;font-size:1.4rem}
"""

# Checks that each count shown in a table equals the number embedded for it, then marks the
# page; a mismatch or an exception is shown on the page and left in the console.
_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("fleet-data").textContent);
  var bad = [];
  document.querySelectorAll("[data-count]").forEach(function (cell) {
    var want = data.counts[cell.getAttribute("data-count")];
    if (String(want) !== cell.textContent.trim()) { bad.push(cell.getAttribute("data-count")); }
  });
  var note = document.getElementById("checked");
  if (bad.length) {
    note.textContent = "counts do not match: " + bad.join(", ");
    console.error(note.textContent);
    return;
  }
  note.textContent = "checked " + Object.keys(data.counts).length + " counts";
  document.documentElement.setAttribute("data-checked", "ok");
})();
"""


def write_page(path: Path, view: FleetView) -> None:
    write_atomic(path, render_page(view).encode("utf-8"))


def render_page(view: FleetView) -> str:
    data = view.to_json()
    counts = _counts(data)
    embedded = json.dumps({"counts": counts}, sort_keys=True).replace("<", "\\u003c")
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode()
    policy = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    body = "\n".join(
        [
            _summary(data),
            "<h2>Convergence per HEAD serial</h2>",
            _chart(data["heads"]),
            _waves(data["rollout"]),
            _applied(data),
            *_lists(data),
        ]
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f"<title>fleet {_e(data['network'])}</title><style>{_STYLE}</style></head><body>\n"
        f"{body}\n"
        "<p class=muted id=checked>not checked (script did not run)</p>\n"
        f'<script type="application/json" id="fleet-data">{embedded}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _counts(data: dict[str, Any]) -> dict[str, int]:
    """Every number the page shows in a ``data-count`` cell, by name."""
    counts = {f"reports.{k}": v for k, v in data["reports"].items()}
    counts |= {
        "converged": data["converged"],
        "failing": len(data["failing"]),
        "hold": len(data["hold"]),
        "quarantine": len(data["quarantine"]),
        "stale": len(data["stale"]),
    }
    for row in (data["rollout"] or {}).get("waves", []):
        for key in ("nodes", "due", "converged", "failed", "silent", "pending"):
            counts[f"wave{row['wave']}.{key}"] = row[key]
    return counts


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _cell(name: str, value: int) -> str:
    return f'<td data-count="{_e(name)}">{value}</td>'


def _summary(data: dict[str, Any]) -> str:
    reports = data["reports"]
    cards = [
        ("nodes", "reports.valid", reports["valid"]),
        ("converged", "converged", data["converged"]),
        ("failing", "failing", len(data["failing"])),
        ("silent", "stale", len(data["stale"])),
        ("invalid", "reports.invalid", reports["invalid"]),
        ("other network", "reports.other_network", reports["other_network"]),
    ]
    shown = "".join(
        f'<div class=card><span data-count="{name}"><b>{value}</b></span>{_e(label)}</div>'
        for label, name, value in cards
    )
    return (
        f"<h1>Fleet: {_e(data['network'])}</h1>"
        f"<p class=muted>{reports['files']} report files read at {_e(data['now'])}; "
        f"converged {data['converged_percent']:g} %; silent after {data['stale_after_s']:g} s "
        f"without a report.</p><div class=cards>{shown}</div>"
    )


def _chart(heads: list[dict[str, Any]]) -> str:
    """Horizontal bars, one per HEAD serial: converged (green) and not yet (amber)."""
    if not heads:
        return "<p class=muted>no reports</p>"
    most = max(row["nodes"] for row in heads) or 1
    width, bar, gap, label = 640, 22, 8, 110
    height = len(heads) * (bar + gap) + gap
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + label + 160}" '
        f'height="{height}" role="img" aria-label="convergence per serial">'
    ]
    for index, row in enumerate(heads):
        y = gap + index * (bar + gap)
        done = row["converged"] * width / most
        rest = (row["nodes"] - row["converged"]) * width / most
        name = f"serial {row['serial']}" if row["serial"] is not None else "no HEAD"
        parts.append(
            f'<text x="0" y="{y + 16}" font-size="13">{_e(name)}</text>'
            f'<rect x="{label}" y="{y}" width="{done:.1f}" height="{bar}" fill="#2e8b57">'
            f"<title>{row['converged']} converged</title></rect>"
            f'<rect x="{label + done:.1f}" y="{y}" width="{rest:.1f}" height="{bar}" '
            f'fill="#e0a526"><title>{row["nodes"] - row["converged"]} not converged</title></rect>'
            f'<text x="{label + done + rest + 6:.1f}" y="{y + 16}" font-size="12">'
            f"{row['converged']} / {row['nodes']} converged</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _waves(rollout: dict[str, Any] | None) -> str:
    if rollout is None:
        return "<h2>Rollout</h2><p class=muted>no head given (<code>--head</code>)</p>"
    rows = []
    for row in rollout["waves"]:
        wave = row["wave"]
        what = (
            f"wave {wave}: {row['percent']} % at {_e(row['at'])}"
            f"{'' if row['opened'] else ' (not yet)'}"
            if wave
            else "no wave reaches them"
        )
        cells = "".join(
            _cell(f"wave{wave}.{key}", row[key])
            for key in ("nodes", "due", "converged", "failed", "silent", "pending")
        )
        rows.append(f"<tr><td>{what}</td>{cells}</tr>")
    return (
        f"<h2>Rollout of serial {rollout['serial']} ({rollout['percent_now']} % now)</h2>"
        "<table><tr><th>wave</th><th>nodes</th><th>due</th><th>converged</th><th>failed</th>"
        f"<th>silent</th><th>pending</th></tr>{''.join(rows)}</table>"
    )


def _applied(data: dict[str, Any]) -> str:
    applied = "".join(
        f"<tr><td>{_e(r['serial'] if r['serial'] is not None else '(none)')}</td>"
        f"<td><code>{_e(r['config_digest'] or '')}</code></td><td>{r['nodes']}</td></tr>"
        for r in data["applied"]
    )
    agents = "".join(
        f"<tr><td>{_e(r['version'])}</td><td>{r['nodes']}</td></tr>" for r in data["agent_versions"]
    )
    return (
        "<h2>Applied snapshots</h2><table><tr><th>serial</th><th>digest</th><th>nodes</th></tr>"
        f"{applied}</table><h2>Agent versions</h2><table><tr><th>version</th><th>nodes</th></tr>"
        f"{agents}</table>"
    )


def _lists(data: dict[str, Any]) -> list[str]:
    sections = [
        ("Failing", "failing", [(r["node"], r["last_error"]) for r in data["failing"]]),
        ("On hold", "hold", [(node, "") for node in data["hold"]]),
        (
            "In quarantine",
            "quarantine",
            [(r["node"], f"{r['quarantined']} digest(s)") for r in data["quarantine"]],
        ),
        ("Silent", "stale", [(r["node"], f"last report {r['at']}") for r in data["stale"]]),
        ("Invalid reports", "reports.invalid", [(r["file"], r["why"]) for r in data["invalid"]]),
        (
            "Another network",
            "reports.other_network",
            [(r["node"], r["network"]) for r in data["other_network"]],
        ),
    ]
    out = []
    for title, name, items in sections:
        rows = "".join(
            f"<tr><td><code>{_e(a)}</code></td><td class=bad>{_e(b)}</td></tr>"
            for a, b in items[:_LISTED]
        )
        more = (
            f"<p class=muted>… and {len(items) - _LISTED} more</p>" if len(items) > _LISTED else ""
        )
        out.append(
            f'<h2>{title} (<span data-count="{name}">{len(items)}</span>)</h2>'
            f"<table>{rows}</table>{more}"
        )
    return out
