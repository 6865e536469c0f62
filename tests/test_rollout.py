"""Staged rollouts (docs/contract.md §8): the pure core, and heads carrying a rollout through trust.

The position formula is spelled out again here with hashlib, independently of
``reconciler.core.rollout``, and the test vectors are the table of docs/contract.md §8, which a
network operator reproduces in any language.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from reconciler.core.documents import Head, parse_time
from reconciler.core.errors import RejectedError
from reconciler.core.rollout import (
    Entry,
    Position,
    Rollout,
    RolloutError,
    Wave,
    admits,
    describe,
    entry,
    head_position,
    percent_now,
    position,
    salt_of,
)
from reconciler.core.trust import verify_head, verify_initial_root
from tests.support.signing import RepositorySimulator, format_time

REPO_ROOT = Path(__file__).resolve().parent.parent
NOW = 1_790_000_000.0  # 2026-09-21
DIGEST = "sha256:" + "ab" * 32


def formula(salt: str, public: bytes) -> int:
    """docs/contract.md §8, written out: hundredths of a percent, 0..9999."""
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + public).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def at(text: str) -> int:
    return parse_time(text)


def rollout(*waves: tuple[str, int], salt: str | None = None) -> Rollout:
    return Rollout(waves=tuple(Wave(at=at(t), percent=p) for t, p in waves), salt=salt)


# ---- test vectors ---------------------------------------------------------------------------

# (salt, public key hex, first 8 bytes of the SHA-256 in hex, position): docs/contract.md §8.
VECTORS = [
    ("a", "00" * 32, "a834b58ea6b20b0d", "69.41"),
    ("a", "ff" * 32, "965d68cc3645975e", "88.94"),
    (DIGEST, bytes(range(32)).hex(), "c8f78bb9ac105352", "9.14"),
    ("früh-2026", bytes(range(32)).hex(), "cd8748e1600a1852", "12.34"),
    ("x" * 64, "00" * 32, "f8557ee6dc7a7b0b", "61.55"),
    (
        "fleet-2026",
        "a3fd290aee36e3df337c07ae07336e5a68987fff42ce69810d94eb148899e662",
        "26214667ff023986",
        "49.02",
    ),
    (
        "canary",
        "366a0551d257be9ed5efb34d5f62478623c4fab5563942e67dcd2f301358a214",
        "ecbead4e6d766eb0",
        "0.00",
    ),
    (
        "canary",
        "a2c02c3710ec0e7311679be3422d2581e18850c8d1c8cbb963501e8eb8631fd0",
        "1152968e6baa1601",
        "0.01",
    ),
    (
        "canary",
        "4faaf9326acc4d77550c69a307ad79c0030ed070ea8311f17e5d2311e1877321",
        "deb5a11024554fee",
        "99.98",
    ),
    (
        "canary",
        "c8a4ac05720370b30a4bd9fb86fe78d6f5d029d0c9ba2a356bf7fd263d33e3ed",
        "d5ba93e3c18a2daf",
        "99.99",
    ),
]


@pytest.mark.parametrize(("salt", "public", "prefix", "expected"), VECTORS)
def test_vectors(salt: str, public: str, prefix: str, expected: str) -> None:
    raw = bytes.fromhex(public)
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + raw).digest()
    assert digest[:8].hex() == prefix
    assert str(position(salt, raw)) == expected
    assert position(salt, raw).hundredths == formula(salt, raw)


def test_the_vectors_are_the_ones_the_contract_prints() -> None:
    text = (REPO_ROOT / "docs/contract.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `([^`]*)` \| `([0-9a-f]{64})` \| `([0-9a-f]{16})` \| `([0-9.]+)` \|$",
        text,
        flags=re.MULTILINE,
    )
    assert rows == VECTORS


def test_the_canary_vector_keys_are_real_node_keys() -> None:
    # The four "canary" keys are Ed25519 public keys, found by searching seeds edge-N.
    publics = {
        bytes(SigningKey(hashlib.sha256(b"edge-%d" % n).digest()).verify_key).hex()
        for n in (13830, 3419, 4007, 1569)
    }
    assert publics == {p for s, p, _, _ in VECTORS if s == "canary"}


def test_the_default_salt_is_the_config_digest_string() -> None:
    public = bytes(range(32))
    head = Head(network="testnet", serial=1, config_digest=DIGEST, issued_at=0, expires=1)
    assert salt_of(None, DIGEST) == DIGEST
    assert head_position(head, public) == Position(914)
    salted = Head(
        network="testnet",
        serial=1,
        config_digest=DIGEST,
        issued_at=0,
        expires=1,
        rollout=rollout(("2026-12-01T00:00:00Z", 5), salt="a"),
    )
    assert salt_of(salted.rollout, DIGEST) == "a"
    assert head_position(salted, bytes(32)) == Position(6941)


def test_a_position_needs_a_32_byte_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        position("a", b"\0" * 31)


# ---- positions are exact --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hundredths", "text"),
    [(0, "0.00"), (5, "0.05"), (310, "3.10"), (3721, "37.21"), (9999, "99.99")],
)
def test_positions_print_with_two_decimals(hundredths: int, text: str) -> None:
    assert str(Position(hundredths)) == text


@pytest.mark.parametrize("hundredths", [-1, 10000])
def test_a_position_lies_in_0_to_100(hundredths: int) -> None:
    with pytest.raises(ValueError):
        Position(hundredths)


def test_below_is_integer_arithmetic() -> None:
    assert Position(2499).below(25)
    assert not Position(2500).below(25)
    assert not Position(0).below(0)
    assert Position(9999).below(100)
    # 0.29 * 100 is 28.999999999999996 in floating point: no float takes part here.
    assert Position(28).below(1) and not Position(100).below(1)


# ---- the percent in force, and entry --------------------------------------------------------

STAGED = rollout(
    ("2026-12-01T10:00:00Z", 1),
    ("2026-12-01T12:00:00Z", 5),
    ("2026-12-02T10:00:00Z", 25),
    ("2026-12-03T10:00:00Z", 25),
    ("2026-12-04T10:00:00Z", 90),
)


@pytest.mark.parametrize(
    ("when", "percent"),
    [
        ("2026-12-01T09:59:59Z", 0),
        ("2026-12-01T10:00:00Z", 1),
        ("2026-12-01T11:59:59Z", 1),
        ("2026-12-01T12:00:00Z", 5),
        ("2026-12-02T09:59:59Z", 5),
        ("2026-12-03T10:00:00Z", 25),
        ("2030-01-01T00:00:00Z", 90),
    ],
)
def test_percent_now_is_the_last_opened_wave(when: str, percent: int) -> None:
    assert percent_now(STAGED, at(when)) == percent
    assert percent_now(STAGED, at(when) + 0.5) == percent


def test_without_a_rollout_every_node_is_in_at_once() -> None:
    assert percent_now(None, 0) == 100
    assert admits(None, Position(9999), 0)
    assert describe(None, Position(9999), 0) == "no rollout: every node takes it at once"


@pytest.mark.parametrize(
    ("hundredths", "expected"),
    [
        (0, Entry(wave=1, at=at("2026-12-01T10:00:00Z"))),
        (99, Entry(wave=1, at=at("2026-12-01T10:00:00Z"))),
        (100, Entry(wave=2, at=at("2026-12-01T12:00:00Z"))),
        (2499, Entry(wave=3, at=at("2026-12-02T10:00:00Z"))),
        (2500, Entry(wave=5, at=at("2026-12-04T10:00:00Z"))),
        (8999, Entry(wave=5, at=at("2026-12-04T10:00:00Z"))),
        (9000, None),
    ],
)
def test_entry_is_the_first_wave_above_the_position(
    hundredths: int, expected: Entry | None
) -> None:
    assert entry(STAGED, Position(hundredths)) == expected


def test_admits_exactly_when_the_entry_wave_has_opened() -> None:
    for hundredths in range(0, 10000, 7):
        place = Position(hundredths)
        found = entry(STAGED, place)
        for when in (w.at + d for w in STAGED.waves for d in (-1, 0)):
            assert admits(STAGED, place, when) == (found is not None and found.at <= when)


def test_status_phrases() -> None:
    now = at("2026-12-01T12:30:00Z")
    assert describe(STAGED, Position(3721), now) == (
        "rollout 5 % now, this node at 37.21 %, enters at 2026-12-04T10:00:00Z (wave 5)"
    )
    assert describe(STAGED, Position(2000), now) == (
        "rollout 5 % now, this node at 20.00 %, enters at 2026-12-02T10:00:00Z (wave 3)"
    )
    assert describe(STAGED, Position(9710), now) == (
        "rollout 5 % now, this node at 97.10 %, no wave reaches it"
    )
    assert describe(STAGED, Position(310), now) == (
        "rollout 5 % now, this node at 3.10 %, in since 2026-12-01T12:00:00Z (wave 2)"
    )
    assert describe(STAGED, Position(310), at("2026-12-01T00:00:00Z")) == (
        "rollout 0 % now, this node at 3.10 %, enters at 2026-12-01T12:00:00Z (wave 2)"
    )


# ---- pausing and continuing -----------------------------------------------------------------


def test_pause_keeps_every_moment_up_to_now_and_freezes_after() -> None:
    now = at("2026-12-02T11:00:00Z")
    paused = STAGED.paused(now)
    assert paused.waves == STAGED.waves[:3]
    for when in [w.at + d for w in STAGED.waves for d in (-1, 0, 1)]:
        expected = percent_now(STAGED, min(when, now))
        assert percent_now(paused, when) == expected


def test_pause_before_the_first_wave_freezes_at_zero() -> None:
    now = at("2026-11-30T08:00:00Z") + 0.75
    paused = STAGED.paused(now)
    assert paused.waves == (Wave(at=at("2026-11-30T08:00:00Z"), percent=0),)
    assert percent_now(paused, now) == 0
    assert percent_now(paused, now + 10 * 86400) == 0


def test_followed_by_keeps_the_rules() -> None:
    paused = STAGED.paused(at("2026-12-01T12:30:00Z"))
    more = paused.followed_by([Wave(at=at("2026-12-05T00:00:00Z"), percent=100)])
    assert [w.percent for w in more.waves] == [1, 5, 100]
    with pytest.raises(RolloutError, match="wave 3 percent 0 is below wave 2's 5"):
        paused.followed_by([Wave(at=at("2026-12-05T00:00:00Z"), percent=0)])


def test_payload_round_trip() -> None:
    salted = rollout(("2026-12-01T10:00:00Z", 1), ("2026-12-02T10:00:00Z", 100), salt="s")
    assert salted.to_payload() == {
        "salt": "s",
        "waves": [
            {"at": "2026-12-01T10:00:00Z", "percent": 1},
            {"at": "2026-12-02T10:00:00Z", "percent": 100},
        ],
    }
    assert Rollout.from_payload(salted.to_payload()) == salted
    assert "salt" not in STAGED.to_payload()


# ---- a fleet --------------------------------------------------------------------------------


def test_a_fleet_of_200_enters_wave_by_wave_exactly_by_the_formula() -> None:
    publics = [
        bytes(SigningKey(hashlib.sha256(b"node-%d" % n).digest()).verify_key) for n in range(200)
    ]
    start = at("2026-12-01T10:00:00Z")
    staged = Rollout(
        waves=tuple(Wave(at=start + 3600 * i, percent=p) for i, p in enumerate([1, 5, 25, 50, 100]))
    )
    head = Head(
        network="testnet",
        serial=9,
        config_digest=DIGEST,
        issued_at=start,
        expires=start + 86400,
        rollout=staged,
    )
    assert not any(admits(staged, head_position(head, p), start - 1) for p in publics)
    counts = []
    for wave in staged.waves:
        inside = {p for p in publics if admits(staged, head_position(head, p), wave.at)}
        expected = {p for p in publics if formula(DIGEST, p) < wave.percent * 100}
        assert inside == expected
        counts.append(len(inside))
    assert counts == sorted(counts)
    assert counts[-1] == 200
    # Each node's entry wave is the first in which it was counted.
    for public in publics:
        found = entry(staged, head_position(head, public))
        assert found is not None
        first = next(w for w in staged.waves if formula(DIGEST, public) < w.percent * 100)
        assert found.at == first.at


def test_a_salt_places_the_fleet_the_same_way_for_every_snapshot() -> None:
    publics = [
        bytes(SigningKey(hashlib.sha256(b"node-%d" % n).digest()).verify_key) for n in range(50)
    ]
    staged = rollout(("2026-12-01T10:00:00Z", 10), salt="canaries")
    heads = [
        Head(
            network="testnet",
            serial=s,
            config_digest="sha256:" + f"{s:02x}" * 32,
            issued_at=0,
            expires=1,
            rollout=staged,
        )
        for s in (1, 2)
    ]
    first, second = ([head_position(h, p) for p in publics] for h in heads)
    assert first == second
    unsalted = [
        Head(
            network="testnet",
            serial=h.serial,
            config_digest=h.config_digest,
            issued_at=0,
            expires=1,
        )
        for h in heads
    ]
    assert [head_position(unsalted[0], p) for p in publics] != [
        head_position(unsalted[1], p) for p in publics
    ]


# ---- heads with a rollout through the real verify_head ---------------------------------------


@pytest.fixture
def network() -> RepositorySimulator:
    return RepositorySimulator(now=NOW)


def verified(network: RepositorySimulator, body: Any) -> Head:
    def edit(head: dict[str, Any]) -> None:
        head["rollout"] = body

    release = network.release(mutate_head=edit)
    root = verify_initial_root(network.roots[1], network="testnet").root
    return verify_head(
        root, release.head, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head


def rejected(network: RepositorySimulator, body: Any) -> str:
    with pytest.raises(RejectedError) as caught:
        verified(network, body)
    return caught.value.one_line()


def t(offset_h: float) -> str:
    return format_time(NOW + offset_h * 3600)


def waves(*pairs: tuple[float, Any]) -> list[dict[str, Any]]:
    return [{"at": t(h), "percent": p} for h, p in pairs]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"waves": waves((1, 5))}, id="one-wave"),
        pytest.param({"waves": waves((-1, 0), (0, 0), (1, 100))}, id="0-and-100"),
        pytest.param({"waves": waves((1, 5), (2, 5), (3, 5))}, id="equal-percents"),
        pytest.param({"waves": waves(*((h, min(100, 4 * h)) for h in range(32)))}, id="32-waves"),
        pytest.param({"salt": "x", "waves": waves((1, 5))}, id="salt-1"),
        pytest.param({"salt": "é" * 64, "waves": waves((1, 5))}, id="salt-64-chars"),
    ],
)
def test_a_head_with_a_valid_rollout_is_accepted(
    network: RepositorySimulator, body: dict[str, Any]
) -> None:
    head = verified(network, body)
    assert head.rollout == Rollout.from_payload(body)
    assert head.rollout.to_payload() == body


def test_a_head_without_a_rollout_has_none(network: RepositorySimulator) -> None:
    release = network.release()
    root = verify_initial_root(network.roots[1], network="testnet").root
    head = verify_head(
        root, release.head, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head
    assert head.rollout is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "waves": [
                    {"at": "2026-12-01T10:00:00Z", "percent": 1},
                    {"at": "2026-12-01T11:00:00Z", "percent": 25},
                    {"at": "2026-12-01T11:00:00Z", "percent": 50},
                ]
            },
            "rollout wave 3 `at` 2026-12-01T11:00:00Z is not after wave 2's",
        ),
        (
            {
                "waves": [
                    {"at": "2026-12-02T10:00:00Z", "percent": 1},
                    {"at": "2026-12-01T10:00:00Z", "percent": 25},
                ]
            },
            "rollout wave 2 `at` 2026-12-01T10:00:00Z is not after wave 1's",
        ),
        (
            {
                "waves": [
                    {"at": "2026-12-01T10:00:00Z", "percent": 25},
                    {"at": "2026-12-02T10:00:00Z", "percent": 10},
                ]
            },
            "rollout wave 2 percent 10 is below wave 1's 25",
        ),
        (
            {"salt": "\ud800", "waves": [{"at": "2026-12-01T10:00:00Z", "percent": 25}]},
            "rollout salt is not valid Unicode (a lone surrogate)",
        ),
    ],
)
def test_rules_no_schema_states_reject_the_head(
    network: RepositorySimulator, body: Any, message: str
) -> None:
    assert rejected(network, body) == f"rejected head.json: {message}"


SCHEMA = "rejected head.json: payload does not match the head schema: "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"waves": []}, "rollout/waves: [] should be non-empty"),
        (
            {"waves": waves(*((h, 50) for h in range(33)))},
            "rollout/waves: 33 items, at most 32 allowed",
        ),
        (
            {"waves": waves((1, 101))},
            "rollout/waves/0/percent: 101 is greater than the maximum of 100",
        ),
        ({"waves": waves((1, -1))}, "rollout/waves/0/percent: -1 is less than the minimum of 0"),
        ({"waves": waves((1, 1.5))}, "rollout/waves/0/percent: 1.5 is not of type 'integer'"),
        ({"waves": waves((1, True))}, "rollout/waves/0/percent: True is not of type 'integer'"),
        ({"salt": "", "waves": waves((1, 5))}, "rollout/salt: '' should be non-empty"),
        (
            {"salt": "x" * 65, "waves": waves((1, 5))},
            "rollout/salt: 65 characters, at most 64 allowed",
        ),
        ({"salt": 7, "waves": waves((1, 5))}, "rollout/salt: 7 is not of type 'string'"),
        ({}, "rollout: 'waves' is a required property"),
        (
            {"waves": waves((1, 5)), "speed": 2},
            "rollout: Additional properties are not allowed ('speed' was unexpected)",
        ),
        (
            {"waves": [{"at": t(1), "percent": 5, "region": "eu"}]},
            "rollout/waves/0: Additional properties are not allowed ('region' was unexpected)",
        ),
        ({"waves": [{"percent": 5}]}, "rollout/waves/0: 'at' is a required property"),
        (
            {"waves": [{"at": "2026-12-01 10:00:00Z", "percent": 5}]},
            "rollout/waves/0/at: '2026-12-01 10:00:00Z' is not a 'date-time'",
        ),
        (
            {"waves": [{"at": "2026-02-30T10:00:00Z", "percent": 5}]},
            "rollout/waves/0/at: '2026-02-30T10:00:00Z' is not a 'date-time'",
        ),
        (
            {"waves": [{"at": "2026-12-01T10:00:00+00:00", "percent": 5}]},
            "rollout/waves/0/at: '2026-12-01T10:00:00+00:00' does not match "
            "'^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$'",
        ),
        ([], "rollout: [] is not of type 'object'"),
    ],
)
def test_schema_rules_reject_the_head_with_their_place(
    network: RepositorySimulator, body: Any, message: str
) -> None:
    assert rejected(network, body) == SCHEMA + message


def test_a_rollout_rule_is_checked_after_the_signatures(network: RepositorySimulator) -> None:
    bad = {"waves": [{"at": t(2), "percent": 5}, {"at": t(1), "percent": 5}]}
    release = network.release(mutate_head=lambda h: h.update(rollout=bad), head_signers=["k9"])
    root = verify_initial_root(network.roots[1], network="testnet").root
    with pytest.raises(RejectedError, match="0 valid signature"):
        verify_head(root, release.head, network="testnet", now=NOW, last_serial=0, last_digest=None)
