"""``reconcile fleet DIR``: a generated folder of good, forged and silent reports, exact counts.

Reports are made and signed by the test suite's own DSSE code (``tests.support.reports``);
the rollout positions the per-wave counts are checked against are computed here from the
formula of docs/contract.md §8, not with the product's ``core.rollout``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from tests.support.reports import node_key, report_payload, signed_report, write_report
from tests.support.signing import canonical, format_time, named_key, sign_envelope

NOW = 1_800_000_000  # 2027-01-15T08:00:00Z
HEAD_DIGEST = "sha256:" + "a" * 64  # what tests.support.reports' nodes applied
OLD_DIGEST = "sha256:" + "b" * 64
WAVES = [
    {"at": format_time(NOW - 3600), "percent": 10},
    {"at": format_time(NOW - 60), "percent": 50},
    {"at": format_time(NOW + 3600), "percent": 100},
]


def run_fleet(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["fleet", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def write_head(path: Path, *, rollout: dict[str, Any] | None) -> Path:
    payload: dict[str, Any] = {
        "network": "testnet",
        "serial": 7,
        "config_digest": HEAD_DIGEST,
        "issued_at": format_time(NOW - 7200),
        "expires": format_time(NOW + 86400),
    }
    if rollout is not None:
        payload["rollout"] = rollout
    head = canonical(payload)
    path.write_bytes(sign_envelope("application/vnd.resultity.head+json", head, [named_key("k1")]))
    return path


def wave_of(salt: str, public: bytes) -> int:
    """The §8 entry wave, from the formula: the first wave whose percent is above the place."""
    place = int.from_bytes(hashlib.sha256(salt.encode() + b"\0" + public).digest()[:8], "big")
    hundredths = place % 10000
    for number, wave in enumerate(WAVES, start=1):
        if hundredths < wave["percent"] * 100:
            return number
    return 0


def good(folder: Path, number: int, **fields: Any) -> bytes:
    key = node_key(number)
    data = signed_report(key, report_payload(key, at=fields.pop("at", NOW - 5), **fields))
    write_report(folder, key, data)
    return data


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    """The folder: what each node is, to count from."""
    folder = tmp_path / "reports"
    nodes: dict[int, str] = {}
    for number in range(20):
        good(folder, number)
        nodes[number] = "converged"
    good(
        folder,
        20,
        converged=False,
        last_error="apply: pulling the image failed",
        applied={"serial": 6, "config_digest": OLD_DIGEST, "at": format_time(NOW - 900)},
    )
    nodes[20] = "failed"
    good(folder, 21, hold=True, converged=False, head={"serial": 6, "config_digest": OLD_DIGEST})
    nodes[21] = "held"
    good(folder, 22, quarantined=["sha256:" + "c" * 64], converged=False)
    nodes[22] = "quarantined"
    for number in (23, 24):  # silent: last report 200 s ago, more than 3 heartbeats of 30 s
        good(folder, number, at=NOW - 200, converged=False, applied=None, agent_version="0.0.9")
        nodes[number] = "silent"
    good(folder, 25, at=NOW + 120)  # a clock 2 minutes ahead is tolerated
    nodes[25] = "converged"
    _forged(folder)
    return {"folder": folder, "nodes": nodes}


def _forged(folder: Path) -> None:
    victim, thief = node_key(100), node_key(101)
    # Signed by another key than the one in `public`.
    write_report(folder, victim, signed_report(thief, report_payload(victim, at=NOW)))
    # A good report of node 102 stored under node 103's name.
    write_report(
        folder,
        node_key(103),
        signed_report(node_key(102), report_payload(node_key(102), at=NOW)),
    )
    # Another network: valid, listed apart.
    key = node_key(104)
    write_report(folder, key, signed_report(key, report_payload(key, at=NOW, network="mainnet")))
    # Over 64 KiB.
    key = node_key(105)
    models = [{"id": f"model-{i}:v1", "state": "Active"} for i in range(3000)]
    write_report(folder, key, signed_report(key, report_payload(key, at=NOW, models=models)))
    # Not JSON at all.
    write_report(folder, node_key(106), b"\x00not json")
    # Duplicate keys in the payload (signed: only strict parsing catches it).
    key = node_key(107)
    body = canonical(report_payload(key, at=NOW))[:-1] + b',"converged":false}'
    write_report(folder, key, sign_envelope("application/vnd.resultity.report+json", body, [key]))
    # From the future.
    key = node_key(108)
    write_report(folder, key, signed_report(key, report_payload(key, at=NOW + 3600)))
    # A receipt is not a report.
    key = node_key(109)
    write_report(
        folder,
        key,
        signed_report(
            key, report_payload(key, at=NOW), kind="application/vnd.resultity.receipt+json"
        ),
    )


INVALID_WHY = {
    100: "signature does not verify",
    103: "file name is not the key id",
    105: "over 64 KiB",
    106: "not valid JSON",
    107: "duplicate key 'converged'",
    108: "is in the future",
    109: "is not a report",
}


def keyid(number: int) -> str:
    return hashlib.sha256(bytes(node_key(number).verify_key)).hexdigest()


def test_fleet_counts_good_forged_and_silent_reports_exactly(fleet: dict[str, Any]) -> None:
    out = json.loads(run_fleet(str(fleet["folder"]), "--json", "--now", format_time(NOW)).stdout)

    assert out["network"] == "testnet"
    assert out["reports"] == {"files": 34, "valid": 26, "invalid": 7, "other_network": 1}
    assert out["nodes"] == 26
    assert out["converged"] == 21 and out["converged_percent"] == round(100 * 21 / 26, 2)
    assert out["applied"] == [
        {"serial": 7, "config_digest": HEAD_DIGEST, "nodes": 23},
        {"serial": 6, "config_digest": OLD_DIGEST, "nodes": 1},
        {"serial": None, "config_digest": None, "nodes": 2},
    ]
    assert out["heads"] == [
        {"serial": 6, "nodes": 1, "converged": 0},
        {"serial": 7, "nodes": 25, "converged": 21},
    ]
    assert out["failing"] == [
        {"node": keyid(20), "last_error": "apply: pulling the image failed", "converged": False}
    ]
    assert out["hold"] == [keyid(21)]
    assert out["quarantine"] == [{"node": keyid(22), "quarantined": 1}]
    assert sorted(r["node"] for r in out["stale"]) == sorted([keyid(23), keyid(24)])
    assert out["agent_versions"] == [
        {"version": "0.0.9", "nodes": 2},
        {"version": "0.1.0", "nodes": 24},
    ]
    assert out["other_network"] == [{"node": keyid(104), "network": "mainnet"}]
    assert out["rollout"] is None
    why = {r["file"]: r["why"] for r in out["invalid"]}
    assert len(why) == len(INVALID_WHY)
    for number, text in INVALID_WHY.items():
        assert text in why[f"{keyid(number)}.json"], (number, why[f"{keyid(number)}.json"])
    assert all("\n" not in line for line in why.values())


def test_each_wave_counts_due_converged_failed_and_silent_nodes(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    head = write_head(tmp_path / "head.json", rollout={"salt": "fleet-test", "waves": WAVES})

    out = json.loads(
        run_fleet(
            str(fleet["folder"]), "--json", "--now", format_time(NOW), "--head", str(head)
        ).stdout
    )

    # Held and quarantined nodes are neither converged, failed nor silent: still pending.
    expected: dict[int, Counter[str]] = {}
    for number, what in fleet["nodes"].items():
        wave = wave_of("fleet-test", bytes(node_key(number).verify_key))
        row = expected.setdefault(wave, Counter())
        row["nodes"] += 1
        if what in ("converged", "failed", "silent"):
            row[what] += 1
    rollout = out["rollout"]
    assert rollout["serial"] == 7 and rollout["percent_now"] == 50
    by_wave = {row["wave"]: row for row in rollout["waves"]}
    assert [row["wave"] for row in rollout["waves"]][:3] == [1, 2, 3]
    for number in (1, 2, 3):
        want, row, opened = expected.get(number, Counter()), by_wave[number], number < 3
        assert row["opened"] is opened
        assert row["nodes"] == want["nodes"]
        assert row["due"] == (want["nodes"] if opened else 0)
        # Counted in a wave not yet open too: a node that took the snapshot early shows.
        for key in ("converged", "failed", "silent"):
            assert row[key] == want[key], (number, key)
        assert row["pending"] == (
            want["nodes"] - want["converged"] - want["failed"] - want["silent"] if opened else 0
        )
    assert sum(row["nodes"] for row in rollout["waves"]) == 26
    assert sum(row["converged"] for row in rollout["waves"]) == 21
    assert any(expected.get(n) for n in (1, 2)), "the salt puts no node in an open wave"


def test_the_network_option_lists_the_others_apart_and_text_output_says_why(
    fleet: dict[str, Any],
) -> None:
    out = json.loads(
        run_fleet(
            str(fleet["folder"]), "--json", "--now", format_time(NOW), "--network", "mainnet"
        ).stdout
    )
    assert out["nodes"] == 1 and out["reports"]["other_network"] == 26

    text = run_fleet(str(fleet["folder"]), "--now", format_time(NOW)).stdout
    assert "26 valid, 7 invalid, 1 of another network" in text
    assert "converged   21 of 26 nodes" in text
    assert f"invalid     {keyid(106)}.json: " in text


def test_a_folder_of_many_reports_is_checked_in_worker_processes(tmp_path: Path) -> None:
    from reconciler.network.fleet import read_fleet

    folder = tmp_path / "many"
    for number in range(2100):  # above the pool threshold
        good(folder, number)
    (folder / "nodes" / "junk.json").write_bytes(b"{}")

    view = read_fleet(folder, now=NOW, workers=2)

    data = view.to_json()
    assert data["reports"] == {"files": 2101, "valid": 2100, "invalid": 1, "other_network": 0}
    assert data["converged"] == 2100


def test_payload_is_base64_in_the_envelope_and_not_trusted_before_the_signature(
    tmp_path: Path,
) -> None:
    """A payload edited after signing (a converged flag flipped) is invalid."""
    folder = tmp_path / "r"
    data = good(folder, 1, converged=False)
    envelope = json.loads(data)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["converged"] = True
    envelope["payload"] = base64.b64encode(canonical(payload)).decode()
    write_report(folder, node_key(1), json.dumps(envelope).encode())

    out = json.loads(run_fleet(str(folder), "--json", "--now", format_time(NOW)).stdout)
    assert out["reports"]["valid"] == 0 and out["converged"] == 0
    assert "signature does not verify" in out["invalid"][0]["why"]
