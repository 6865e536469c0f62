"""The one command: ``python bench/run.py [--quick] [--only NAME ...] [--table]``.

Runs every benchmark (or the ones named), prints one PASS / MISS / INFO line per figure as it
is measured, and writes ``bench/results.json``: a list of records ``{name, value, unit, target,
baseline, pass, machine, details}``. With ``--only`` the records of the other benchmarks already
in the file are kept, so the file always holds the latest figure of each. ``--table`` prints
the Markdown table of ``results.json`` (for docs/benchmarks.md) and runs nothing.

Exit status: 0 when every figure with a target met it, 1 otherwise (a benchmark that crashed
counts as a miss; its traceback is printed and the others still run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ itself first on the path; the package's modules must be
# imported as bench.* from the repository root instead (and never shadow anything).
if sys.path and Path(sys.path[0]).resolve() == _ROOT / "bench":
    sys.path[0] = str(_ROOT)
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

# In the order they run: cheap in-process ones first, then the ones that need big files,
# then the ones that share the Podman lab.
BENCHMARKS = (
    "startup",
    "ingest",
    "plan",
    "poll_cost",
    "download",
    "segmented",
    "dedupe",
    "resume",
    "once_model",
    "many_files",
    "noop",
    "watch_memory",
    "downtime",
    "fleet",
    "swarm",
)
RESULTS = _ROOT / "bench" / "results.json"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke check")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--table", action="store_true", help="print results.json as Markdown")
    return parser.parse_args(argv)


def _error_record(name: str, exc: BaseException, machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"{name}.error",
        "value": None,
        "unit": "",
        "target": "runs to completion",
        "baseline": None,
        "pass": False,
        "machine": machine,
        "details": {"error": f"{type(exc).__name__}: {exc}"[:2000]},
    }


def _merge(path: Path, fresh: list[dict[str, Any]], ran: list[str]) -> list[dict[str, Any]]:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        old = []
    kept = [r for r in old if r.get("name", "").split(".")[0] not in ran]
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    merged = kept + fresh
    merged.sort(key=lambda r: order.get(r["name"].split(".")[0], len(order)))
    return merged


def markdown_table(records: list[dict[str, Any]]) -> str:
    from bench.harness import format_value

    lines = [
        "| figure | value | baseline | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        value = "error" if r["value"] is None else format_value(r["value"], r["unit"])
        base = r.get("baseline")
        baseline = f"{format_value(base['value'], base['unit'])}: {base['label']}" if base else "—"
        verdict = {True: "yes", False: "**no**", None: "—"}[r["pass"]]
        target = r["target"] or "—"
        baseline = baseline.replace("|", r"\|")  # a shell pipe inside a table cell
        lines.append(f"| {r['name']} | {value} | {baseline} | {target} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _arguments(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text(encoding="utf-8"))))
        return 0
    from bench.harness import Context, machine_summary

    chosen = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)
    workspace = Path(tempfile.mkdtemp(prefix="rb-"))
    # Child processes cache bytecode, as an installed agent does (pip writes .pyc files at
    # install). A shell with PYTHONDONTWRITEBYTECODE=1 would make every `reconcile` process
    # compile the project's modules from source, ~50 ms that a node never pays. The cache goes
    # to the scratch folder, for the product and the baselines alike.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(workspace / "pycache")
    machine = machine_summary(quick=args.quick)
    ctx = Context(quick=args.quick, workspace=workspace, machine=machine)
    print(f"bench: {', '.join(chosen)} in {workspace}{' (quick)' if args.quick else ''}")
    print(f"bench: {machine['cpu']}, {machine['cores']} cores, load {machine['load_1m_at_start']}")
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for name in chosen:
            module = importlib.import_module(f"bench.{name}")
            began = time.monotonic()
            print(f"--- {name}", flush=True)
            try:
                results = module.run(ctx)
            except Exception as exc:  # one broken benchmark must not hide the others
                traceback.print_exc()
                records.append(_error_record(name, exc, machine))
                print(f"MISS  {name}.error: {type(exc).__name__}: {exc}", flush=True)
                continue
            for result in results:
                print(result.line(), flush=True)
                records.append(result.to_json(machine))
            print(f"    ({time.monotonic() - began:.0f} s)", flush=True)
    finally:
        ctx.close()
        if args.keep:
            print(f"bench: scratch kept in {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)
    merged = _merge(args.out, records, chosen)
    args.out.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    missed = [r["name"] for r in records if r["pass"] is False]
    total = time.monotonic() - started
    print(f"bench: {len(records)} figures in {total:.0f} s, wrote {args.out}")
    print("bench: all targets met" if not missed else f"bench: missed {', '.join(missed)}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
