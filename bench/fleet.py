"""fleet: ``reconcile fleet`` over 100,000 signed node reports (10,000 with --quick).

The reports are generated and signed here (each node its own Ed25519 key, the test suite's
DSSE code, about 1.5 KB of payload: two models, two containers, a GPU entry), spread over
three applied serials, with 2 % failing and 1 % silent, and written as a collector stores
them: ``nodes/<keyid>.json``. A ``head.json`` with a three-wave rollout is given, so the
per-wave counts are computed too. Then the real ``reconcile fleet DIR --json --head …`` runs
as a process; the figures are its wall time and its peak memory, the sum of the resident
sets of the process and its worker processes, sampled every 20 ms from /proc.
Targets: ≤ 60 s and ≤ 500 MiB on this machine.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import threading
import time
from pathlib import Path

from bench.harness import RECONCILE, Context, Result, Target, load_average
from tests.support.reports import node_key, report_payload, signed_report
from tests.support.signing import canonical, format_time, named_key, sign_envelope

NAME = "fleet"

_SERIALS = ((7, "sha256:" + "a" * 64), (6, "sha256:" + "b" * 64), (5, "sha256:" + "c" * 64))


def _write_range(task: tuple[Path, int, int, float]) -> int:
    folder, start, stop, now = task
    for number in range(start, stop):
        key = node_key(number)
        serial, digest = _SERIALS[0 if number % 10 < 8 else 1 + number % 2]
        fields = {
            "head": {"serial": 7, "config_digest": _SERIALS[0][1]},
            "applied": {"serial": serial, "config_digest": digest, "at": format_time(now - 600)},
            "converged": serial == 7,
            "models": [
                {"id": "llm-8b:v3", "state": "Active"},
                {"id": "embed:v1", "state": "Active"},
            ],
            "containers": [
                {"name": "reconciler-llm", "state": "running"},
                {"name": "reconciler-embed", "state": "running"},
            ],
            "gpus": {"source": "setting", "devices": [], "vram_mib": 24576},
        }
        if number % 50 == 0:
            fields["last_error"] = (
                "apply: pulling registry.example/llm failed: 503 Service Unavailable"
            )
        at = now - (3600 if number % 100 == 1 else 10)
        payload = report_payload(key, at=at, **fields)
        (folder / f"{payload['node']}.json").write_bytes(signed_report(key, payload))
    return stop - start


def generate(folder: Path, count: int, *, now: float) -> Path:
    """``count`` signed reports in ``folder/nodes``, and a head with waves; the head's path."""
    nodes = folder / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    step = 2000
    tasks = [(nodes, i, min(i + step, count), now) for i in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool() as pool:
        written = sum(pool.imap_unordered(_write_range, tasks))
    assert written == count
    waves = [
        {"at": format_time(now - 7200), "percent": 5},
        {"at": format_time(now - 3600), "percent": 50},
        {"at": format_time(now + 3600), "percent": 100},
    ]
    head = {
        "network": "testnet",
        "serial": 7,
        "config_digest": _SERIALS[0][1],
        "issued_at": format_time(now - 7300),
        "expires": format_time(now + 86400),
        "rollout": {"salt": "bench", "waves": waves},
    }
    path = folder / "head.json"
    path.write_bytes(
        sign_envelope("application/vnd.resultity.head+json", canonical(head), [named_key("k1")])
    )
    return path


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and its children (the pool's workers)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text(encoding="ascii")
            children = Path(f"/proc/{current}/task/{current}/children").read_text(encoding="ascii")
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        todo.extend(int(child) for child in children.split())
    return total


def timed_fleet(folder: Path, head: Path) -> tuple[float, float, dict[str, object]]:
    """(wall seconds, peak MiB of the process tree, the JSON it printed)."""
    peak = 0
    started = time.perf_counter()
    process = subprocess.Popen(
        [RECONCILE, "fleet", str(folder), "--json", "--head", str(head)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kib(process.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"reconcile fleet exited {process.returncode}: {err.decode()[-800:]}")
    return elapsed, peak / 1024, json.loads(out)


def run(ctx: Context) -> list[Result]:
    count = 10_000 if ctx.quick else 100_000
    folder = ctx.folder("fleet")
    now = time.time()
    began = time.monotonic()
    head = generate(folder, count, now=now)
    generated_s = time.monotonic() - began
    seconds, peak_mib, out = timed_fleet(folder, head)
    reports = out["reports"]
    assert isinstance(reports, dict) and reports["valid"] == count, reports
    details = {
        "reports": count,
        "generate_s": round(generated_s, 1),
        "reports_per_s": round(count / seconds),
        "converged_percent": out["converged_percent"],
        "load_1m": load_average(),
    }
    return [
        Result(
            name="fleet.seconds",
            value=seconds,
            unit="s",
            target=Target(60.0 if not ctx.quick else 6.0),
            details=details,
        ),
        Result(
            name="fleet.peak_rss",
            value=peak_mib,
            unit="MiB",
            target=Target(500.0),
            details=details,
        ),
    ]
