"""The network's side of staged rollouts, through the real ``reconcile`` command.

Keys come from ``reconcile keygen``, the root from ``reconcile root``, and what ``reconcile
publish`` writes into a real origin folder is read back with the node's own ``verify_head``.
``reconcile rollout`` is checked against the position formula spelled out with hashlib.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from reconciler.core.documents import Head, format_time, parse_time
from reconciler.core.trust import verify_head, verify_initial_root
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.signing import base_snapshot

PAST_1, PAST_2 = "2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z"
FUTURE_1, FUTURE_2 = "2099-01-01T00:00:00Z", "2099-06-01T00:00:00Z"


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.stderr or result.stdout
    return str(result.stdout)


def refused(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reconcile: "), result.stderr
    return str(lines[0].removeprefix("reconcile: "))


def formula(salt: str, public: bytes) -> int:
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + public).digest()
    return int.from_bytes(digest[:8], "big") % 10000


class Network:
    """An operator's folder: a signing key, root 1, an origin, a snapshot file, node keys."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.origin = home / "origin"
        self.key = home / "k1.key"
        ok("keygen", str(home / "k1"))
        self.root = home / "root.json"
        ok(
            "root",
            "--version",
            "1",
            "--network",
            "testnet",
            "--threshold",
            "1",
            "--public",
            str(home / "k1.pub"),
            "--key",
            str(self.key),
            "--out",
            str(self.root),
        )
        self.snapshot = home / "snapshot.json"
        self.snapshot.write_text(json.dumps(base_snapshot()), encoding="utf-8")

    def publish(self, *options: str) -> str:
        return ok(
            "publish",
            "--origin",
            str(self.origin),
            "--key",
            str(self.key),
            *options,
            str(self.snapshot),
        )

    def refresh(self, *options: str) -> str:
        return ok(
            "publish",
            "--origin",
            str(self.origin),
            "--key",
            str(self.key),
            "--refresh-head",
            *options,
        )

    def refuse(self, *options: str) -> str:
        return refused("publish", "--origin", str(self.origin), "--key", str(self.key), *options)

    def head_bytes(self) -> bytes:
        return (self.origin / "head.json").read_bytes()

    def head_payload(self) -> dict[str, Any]:
        payload = json.loads(base64.b64decode(json.loads(self.head_bytes())["payload"]))
        assert isinstance(payload, dict)
        return payload

    def verified_head(self) -> Head:
        """head.json as a node checks it: signatures, schema, rollout rules, expiry."""
        root = verify_initial_root(self.root.read_bytes(), network="testnet").root
        return verify_head(
            root,
            self.head_bytes(),
            network="testnet",
            now=time.time(),
            last_serial=0,
            last_digest=None,
        ).head

    def node_keys(self, count: int) -> list[bytes]:
        folder = self.home / "nodes"
        folder.mkdir(exist_ok=True)
        for n in range(count):
            ok("keygen", str(folder / f"node-{n:02d}"))
            (folder / f"node-{n:02d}.key").unlink()  # the node keeps its private half
        return [bytes.fromhex((folder / f"node-{n:02d}.pub").read_text()) for n in range(count)]


@pytest.fixture
def net(tmp_path: Path) -> Network:
    return Network(tmp_path)


def waves_of(head: dict[str, Any]) -> list[tuple[str, int]]:
    return [(w["at"], w["percent"]) for w in head["rollout"]["waves"]]


# ---- publish with waves ---------------------------------------------------------------------


def test_publish_signs_the_waves_into_head_json(net: Network) -> None:
    out = net.publish(
        "--wave", "now=1", "--wave", "+90m=5", "--wave", "+1d=25%", "--wave", FUTURE_2 + "=100"
    )
    head = net.head_payload()
    issued = parse_time(head["issued_at"])
    assert waves_of(head) == [
        (format_time(issued), 1),
        (format_time(issued + 90 * 60), 5),
        (format_time(issued + 86400), 25),
        (FUTURE_2, 100),
    ]
    assert "salt" not in head["rollout"]
    verified = net.verified_head()
    assert verified.rollout is not None and len(verified.rollout.waves) == 4
    assert out.splitlines()[1] == (
        f"rollout 1 % now: 1 % from {format_time(issued)}, 5 % from "
        f"{format_time(issued + 5400)}, 25 % from {format_time(issued + 86400)}, "
        f"100 % from {FUTURE_2}"
    )


def test_publish_with_a_salt(net: Network) -> None:
    net.publish("--wave", FUTURE_1 + "=10", "--rollout-salt", "canaries")
    assert net.head_payload()["rollout"] == {
        "salt": "canaries",
        "waves": [{"at": FUTURE_1, "percent": 10}],
    }
    assert net.verified_head().rollout is not None


def test_publish_without_waves_has_no_rollout(net: Network) -> None:
    net.publish()
    assert "rollout" not in net.head_payload()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--wave", "+2h=5", "--wave", "+1h=10"], "is not after wave 1's"),
        (
            ["--wave", "+1h=50", "--wave", "+2h=10"],
            "rollout wave 2 percent 10 is below wave 1's 50",
        ),
        (["--wave", "+1h=101"], "--wave '+1h=101': the percent is a whole number from 0 to 100"),
        (["--wave", "+1h"], "--wave '+1h': expected AT=PERCENT, e.g. +1h=5"),
        (["--wave", "soon=5"], "--wave 'soon=5': 'soon' is not a time"),
        (["--wave", "+0h=5"], "--wave '+0h=5': '0h' is not a duration"),
        (["--wave", "2026-02-30T00:00:00Z=5"], "'2026-02-30T00:00:00Z' is not a real UTC time"),
        (["--wave", "2026-2-3T00:00:00Z=5"], "'2026-2-3T00:00:00Z' is not a time"),
        (
            [*[a for h in range(33) for a in ("--wave", f"+{h + 1}h=50")]],
            "refusing this rollout: rollout has 33 waves, 1 to 32 allowed",
        ),
        (
            ["--wave", "+1h=5", "--rollout-salt", "x" * 65],
            "refusing this rollout: rollout salt has 65 characters, 1 to 64 allowed",
        ),
        (["--rollout-salt", "s"], "--rollout-salt places nodes in waves: give --wave too"),
        (["--pause"], "--pause and --resume change a published head: add --refresh-head"),
        (
            ["--resume", "--wave", "+1h=5"],
            "--pause and --resume change a published head: add --refresh-head",
        ),
    ],
)
def test_publish_refuses_bad_waves_and_writes_nothing(
    net: Network, options: list[str], message: str
) -> None:
    net.publish()
    before = net.head_bytes()
    snapshots = sorted((net.origin / "snapshots").iterdir())
    net.snapshot.write_text(json.dumps({**base_snapshot(), "serial": 2}), encoding="utf-8")
    assert message in net.refuse(*options, str(net.snapshot))
    assert net.head_bytes() == before
    assert sorted((net.origin / "snapshots").iterdir()) == snapshots


# ---- refresh-head: keep, replace, pause, resume ---------------------------------------------


def test_refresh_head_keeps_the_rollout(net: Network) -> None:
    net.publish("--wave", PAST_1 + "=1", "--wave", FUTURE_1 + "=100")
    before = net.head_payload()
    net.refresh("--expires-in", "30d")
    after = net.head_payload()
    assert after["rollout"] == before["rollout"]
    assert (after["serial"], after["config_digest"]) == (before["serial"], before["config_digest"])
    assert after["expires"] > before["expires"]


def test_pause_keeps_what_opened_and_drops_what_was_to_come(net: Network) -> None:
    net.publish(
        "--wave",
        PAST_1 + "=1",
        "--wave",
        PAST_2 + "=5",
        "--wave",
        FUTURE_1 + "=25",
        "--wave",
        FUTURE_2 + "=100",
    )
    digest = net.head_payload()["config_digest"]
    out = net.refresh("--pause")
    head = net.head_payload()
    assert waves_of(head) == [(PAST_1, 1), (PAST_2, 5)]
    assert head["config_digest"] == digest and head["serial"] == 1
    assert net.verified_head().rollout is not None
    assert out.splitlines()[1] == f"rollout 5 % now: 1 % from {PAST_1}, 5 % from {PAST_2}"


def test_pause_before_the_first_wave_freezes_at_zero(net: Network) -> None:
    net.publish("--wave", FUTURE_1 + "=25")
    net.refresh("--pause")
    [(when, percent)] = waves_of(net.head_payload())
    assert percent == 0
    assert abs(parse_time(when) - time.time()) < 60


def test_resume_continues_from_where_it_stopped(net: Network) -> None:
    net.publish("--wave", PAST_1 + "=1", "--wave", PAST_2 + "=5", "--wave", FUTURE_1 + "=25")
    net.refresh("--pause")
    net.refresh("--resume", "--wave", FUTURE_1 + "=50", "--wave", FUTURE_2 + "=100")
    assert waves_of(net.head_payload()) == [
        (PAST_1, 1),
        (PAST_2, 5),
        (FUTURE_1, 50),
        (FUTURE_2, 100),
    ]
    assert net.verified_head().rollout is not None


def test_new_waves_replace_the_old_ones(net: Network) -> None:
    net.publish("--wave", PAST_1 + "=5", "--wave", FUTURE_1 + "=25")
    net.refresh("--wave", PAST_2 + "=10", "--wave", FUTURE_2 + "=100")
    assert waves_of(net.head_payload()) == [(PAST_2, 10), (FUTURE_2, 100)]


@pytest.mark.parametrize(
    ("publish", "options", "message"),
    [
        (
            ["--wave", PAST_1 + "=25"],
            ["--wave", FUTURE_1 + "=100"],
            "the new waves give 0 % now, below the 25 % the rollout has reached",
        ),
        (
            ["--wave", PAST_1 + "=25"],
            ["--wave", PAST_2 + "=10"],
            "the new waves give 10 % now, below the 25 % the rollout has reached",
        ),
        ([], ["--pause"], "head.json has no rollout: every node may already have taken it"),
        ([], ["--wave", FUTURE_1 + "=5"], "head.json has no rollout"),
        (
            ["--wave", PAST_1 + "=1"],
            ["--rollout-salt", "other"],
            "the rollout has started: another salt would move nodes between waves",
        ),
        (["--wave", PAST_1 + "=1"], ["--pause", "--wave", FUTURE_1 + "=5"], "--pause freezes"),
        (["--wave", PAST_1 + "=1"], ["--resume"], "--resume continues a paused rollout"),
        (
            ["--wave", PAST_1 + "=1", "--wave", PAST_2 + "=5"],
            ["--resume", "--wave", PAST_1 + "=50"],
            f"rollout wave 3 `at` {PAST_1} is not after wave 2's",
        ),
    ],
)
def test_refresh_refuses_a_rollout_that_contradicts_the_fleet(
    net: Network, publish: list[str], options: list[str], message: str
) -> None:
    net.publish(*publish)
    before = net.head_bytes()
    assert message in net.refuse("--refresh-head", *options)
    assert net.head_bytes() == before


def test_a_salt_may_change_before_the_first_wave(net: Network) -> None:
    net.publish("--wave", FUTURE_1 + "=5")
    net.refresh("--rollout-salt", "fresh")
    assert net.head_payload()["rollout"] == {
        "salt": "fresh",
        "waves": [{"at": FUTURE_1, "percent": 5}],
    }


def test_a_node_accepts_a_head_with_a_rollout(net: Network, tmp_path: Path) -> None:
    net.publish("--wave", "now=100")
    node = NodeUnderTest(tmp_path / "node")
    node.home.mkdir()
    node.init(f"file://{net.origin}/", net.root.read_bytes()).ok()
    node.fetch().ok()
    assert node.status()["head"]["serial"] == 1


# ---- reconcile rollout ----------------------------------------------------------------------


def test_rollout_lists_every_node_by_the_formula(net: Network) -> None:
    publics = net.node_keys(12)
    net.publish("--wave", PAST_1 + "=10", "--wave", FUTURE_1 + "=50", "--wave", FUTURE_2 + "=90")
    digest = net.head_payload()["config_digest"]
    report = json.loads(
        ok("rollout", "--head", str(net.origin), "--nodes", str(net.home / "nodes"), "--json")
    )
    assert report["salt"] == digest and report["salt_from"] == "config_digest"
    assert report["percent_now"] == 10 and report["total"] == 12
    expected = {f"node-{n:02d}": formula(digest, p) for n, p in enumerate(publics)}
    listed = {n["name"]: n for n in report["nodes"]}
    assert {name: n["position_hundredths"] for name, n in listed.items()} == expected
    cuts = [(1, 1000, PAST_1), (2, 5000, FUTURE_1), (3, 9000, FUTURE_2)]
    for name, hundredths in expected.items():
        node = listed[name]
        assert node["position"] == f"{hundredths // 100}.{hundredths % 100:02d}"
        assert node["in"] == (hundredths < 1000)
        wave = next((c for c in cuts if hundredths < c[1]), None)
        assert (node["wave"], node["enters"]) == ((wave[0], wave[2]) if wave else (None, None))
    for number, limit, when in cuts:
        row = report["waves"][number - 1]
        assert (row["wave"], row["at"], row["open"]) == (number, when, number == 1)
        assert row["in"] == sum(1 for h in expected.values() if h < limit)
    assert [w["in"] for w in report["waves"]] == sorted(w["in"] for w in report["waves"])
    assert sum(w["entering"] for w in report["waves"]) + report["unreached"] == 12
    assert report["in_now"] == report["waves"][0]["in"]
    positions = [n["position_hundredths"] for n in report["nodes"]]
    assert positions == sorted(positions)


def test_rollout_at_another_time(net: Network) -> None:
    net.node_keys(6)
    net.publish("--wave", FUTURE_1 + "=50", "--wave", FUTURE_2 + "=100")
    nodes = str(net.home / "nodes")
    before = json.loads(ok("rollout", "--head", str(net.origin), "--nodes", nodes, "--json"))
    after = json.loads(
        ok(
            "rollout",
            "--head",
            str(net.origin / "head.json"),
            "--nodes",
            nodes,
            "--at",
            FUTURE_2,
            "--json",
        )
    )
    assert (before["percent_now"], before["in_now"]) == (0, 0)
    assert (after["percent_now"], after["in_now"], after["at"]) == (100, 6, FUTURE_2)


def test_rollout_text_shows_who_is_due(net: Network) -> None:
    publics = net.node_keys(3)
    net.publish("--wave", PAST_1 + "=1", "--wave", FUTURE_1 + "=100")
    digest = net.head_payload()["config_digest"]
    lines = ok(
        "rollout", "--head", str(net.origin), "--nodes", str(net.home / "nodes")
    ).splitlines()
    assert lines[0] == f"head serial 1 {digest}, salt the config_digest"
    assert lines[1].startswith("rollout 0 % now (") or lines[1].startswith("rollout 1 % now (")
    assert lines[2] == "wave  opens                 percent  entering  in after"
    assert lines[3].startswith(f"1     {PAST_1}      1 %")
    assert lines[4].startswith(f"2     {FUTURE_1}    100 %") and lines[4].endswith("next")
    assert lines[5].startswith("-     no wave reaches")
    ordered = sorted((formula(digest, p), f"node-{n:02d}") for n, p in enumerate(publics))
    for line, (hundredths, name) in zip(lines[7:10], ordered, strict=True):
        words = line.split()
        assert words[0] == name and words[1] == f"{hundredths // 100}.{hundredths % 100:02d}"
        state = "in" if hundredths < 100 else "due"
        assert words[-1] == state
        assert words[-2] == (PAST_1 if hundredths < 100 else FUTURE_1)
    assert lines[-1].endswith("of 3 nodes in now")


def test_rollout_reads_key_lists_with_names_and_comments(net: Network, tmp_path: Path) -> None:
    publics = net.node_keys(3)
    listing = tmp_path / "fleet.txt"
    listing.write_text(
        "# the fleet\n"
        f"{publics[0].hex()} gpu-a\n"
        "\n"
        f"{publics[1].hex()}   # no name\n"
        f"{publics[0].hex()} gpu-a-again\n",
        encoding="utf-8",
    )
    net.publish("--wave", FUTURE_1 + "=50", "--rollout-salt", "fleet")
    report = json.loads(
        ok(
            "rollout",
            "--head",
            str(net.origin),
            "--nodes",
            str(listing),
            "--nodes",
            str(net.home / "nodes" / "node-02.pub"),
            "--json",
        )
    )
    assert report["salt"] == "fleet" and report["salt_from"] == "rollout"
    names = {n["name"]: n["position_hundredths"] for n in report["nodes"]}
    assert names == {
        "gpu-a": formula("fleet", publics[0]),
        "fleet.txt:4": formula("fleet", publics[1]),
        "node-02": formula("fleet", publics[2]),
    }


def test_rollout_of_a_head_without_one(net: Network) -> None:
    net.node_keys(2)
    net.publish()
    report = json.loads(
        ok("rollout", "--head", str(net.origin), "--nodes", str(net.home / "nodes"), "--json")
    )
    assert report["rollout"] is False and report["percent_now"] == 100
    assert report["waves"] == [] and report["in_now"] == 2
    assert all(n["wave"] is None and n["in"] for n in report["nodes"])
    text = ok("rollout", "--head", str(net.origin))
    assert "no rollout: every node takes it at once" in text
    assert "no node keys given" in text


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (
            "zz" * 32,
            "bad.pub",
            "bad.pub:1: expected a 64-hex-digit public key and an optional name",
        ),
        ("ab" * 31, "short.txt", "short.txt:1: expected a 64-hex-digit public key"),
        ("ab" * 32 + " a b", "three.txt", "three.txt:1: expected a 64-hex-digit public key"),
        ("ab" * 32, "node.key", "node.key is a private key; give the node's .pub file"),
    ],
)
def test_rollout_refuses_what_is_not_a_key_list(
    net: Network, tmp_path: Path, content: str, name: str, message: str
) -> None:
    net.publish("--wave", FUTURE_1 + "=50")
    (tmp_path / name).write_text(content + "\n", encoding="utf-8")
    line = refused("rollout", "--head", str(net.origin), "--nodes", str(tmp_path / name))
    assert message in line


def test_rollout_refuses_what_is_not_a_head(net: Network) -> None:
    net.publish()
    snapshot = next((net.origin / "snapshots").iterdir())
    assert "payloadType is" in refused("rollout", "--head", str(snapshot))
    (net.home / "empty").mkdir()
    assert "head.json does not exist" in refused("rollout", "--head", str(net.home / "empty"))


def test_rollout_takes_node_keys_from_a_collector_folder_of_verified_reports(
    net: Network, tmp_path: Path
) -> None:
    from tests.support.reports import node_key, report_payload, signed_report, write_report

    net.publish("--wave", PAST_1 + "=10", "--wave", FUTURE_1 + "=100")
    digest = net.head_payload()["config_digest"]
    collector = tmp_path / "collector"
    keys = [node_key(n) for n in range(5)]
    for key in keys:
        write_report(collector, key, signed_report(key, report_payload(key, at=time.time())))
    forger = node_key(99)
    # A report signed by another key than the one it names: not a node of the fleet.
    forged = signed_report(forger, report_payload(keys[0], at=time.time()))
    write_report(collector, forger, forged, name=hashlib.sha256(b"x").hexdigest() + ".json")

    report = json.loads(
        ok("rollout", "--head", str(net.origin), "--nodes", str(collector / "nodes"), "--json")
    )

    assert report["total"] == 5
    listed = sorted(n["position_hundredths"] for n in report["nodes"])
    assert listed == sorted(formula(digest, bytes(k.verify_key)) for k in keys)
