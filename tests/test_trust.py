"""The pure trust core (docs/contract.md §3) on bytes in memory: no files, no network, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.core.documents import Head, Root
from reconciler.core.errors import RejectedError
from reconciler.core.trust import (
    DEFAULT_LIMITS,
    TrustLimits,
    check_root_fresh,
    check_stored_snapshot,
    reverify_snapshot,
    verify_head,
    verify_initial_root,
    verify_next_root,
    verify_snapshot,
)
from tests.support.signing import (
    HEAD_TYPE,
    ROOT_TYPE,
    SNAPSHOT_TYPE,
    Release,
    RepositorySimulator,
    edit_envelope,
    format_time,
    payload_of,
    replace_payload,
)

NOW = 1_750_000_000.0
SKEW = DEFAULT_LIMITS.clock_skew_s


@pytest.fixture
def network() -> RepositorySimulator:
    return RepositorySimulator(now=NOW)


def root_of(network: RepositorySimulator, version: int = 1) -> Root:
    return verify_initial_root(network.roots[version], network="testnet").root


def head_of(
    network: RepositorySimulator,
    release: Release,
    *,
    last_serial: int = 0,
    last_digest: str | None = None,
    now: float = NOW,
    root: Root | None = None,
) -> Head:
    return verify_head(
        root or root_of(network),
        release.head,
        network="testnet",
        now=now,
        last_serial=last_serial,
        last_digest=last_digest,
    ).head


def rejection(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RejectedError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# ---- the installed root -----------------------------------------------------------------


def test_accepts_a_self_signed_initial_root(network: RepositorySimulator) -> None:
    verified = verify_initial_root(network.roots[1], network="testnet")
    assert verified.root.version == 1
    assert verified.root.threshold == 1
    assert [k.keyid for k in verified.root.keys] == [network.keyid("k1")]
    assert verified.envelope == network.roots[1]


def test_rejects_initial_root_below_its_own_threshold(network: RepositorySimulator) -> None:
    data = network.make_root(1, keys=["k1", "k2"], threshold=2, signers=["k1"])
    assert rejection(verify_initial_root, data, network="testnet") == (
        "rejected root: 1 valid signature(s) by its own keys, threshold is 2"
    )


def test_rejects_initial_root_for_another_network(network: RepositorySimulator) -> None:
    assert rejection(verify_initial_root, network.roots[1], network="mainnet") == (
        "rejected root: network is testnet, this node is on mainnet"
    )


def test_rejects_root_whose_keyid_is_not_the_hash_of_its_key(
    network: RepositorySimulator,
) -> None:
    def swap(payload: dict[str, Any]) -> None:
        payload["keys"][0]["keyid"] = network.keyid("k2")

    data = network.make_root(1, keys=["k1"], mutate=swap)
    message = rejection(verify_initial_root, data, network="testnet")
    assert message.startswith("rejected root: keyid ")
    assert message.endswith("is not sha256 of its public key")


def test_rejects_root_whose_threshold_exceeds_its_keys(network: RepositorySimulator) -> None:
    data = network.make_root(1, keys=["k1"], mutate=lambda p: p.update(threshold=2))
    assert rejection(verify_initial_root, data, network="testnet") == (
        "rejected root: threshold 2 exceeds the 1 keys listed"
    )


def test_rejects_root_listing_a_key_twice(network: RepositorySimulator) -> None:
    data = network.make_root(1, keys=["k1", "k1"], threshold=1, signers=["k1"])
    assert rejection(verify_initial_root, data, network="testnet") == (
        "rejected root: a key is listed twice"
    )


# ---- rotation ---------------------------------------------------------------------------


def test_accepts_next_root_signed_by_old_and_new_keys(network: RepositorySimulator) -> None:
    data = network.make_root(2, keys=["k2", "k3"], threshold=2, signers=["k1", "k2", "k3"])
    verified = verify_next_root(root_of(network), data, network="testnet")
    assert verified.root.version == 2
    assert {k.keyid for k in verified.root.keys} == {network.keyid("k2"), network.keyid("k3")}


def test_rejects_next_root_signed_only_by_new_keys(network: RepositorySimulator) -> None:
    data = network.make_root(2, keys=["k2"], signers=["k2"])
    assert rejection(verify_next_root, root_of(network), data, network="testnet") == (
        "rejected root/2.json: 0 valid signature(s) by the previous root's keys, threshold is 1"
    )


def test_rejects_next_root_below_its_own_threshold(network: RepositorySimulator) -> None:
    data = network.make_root(2, keys=["k2", "k3"], threshold=2, signers=["k1", "k2"])
    assert rejection(verify_next_root, root_of(network), data, network="testnet") == (
        "rejected root/2.json: 1 valid signature(s) by its own keys, threshold is 2"
    )


@pytest.mark.parametrize("version", [1, 3])
def test_rejects_next_root_with_another_version(network: RepositorySimulator, version: int) -> None:
    data = network.make_root(version, keys=["k1"], write=False)
    assert rejection(verify_next_root, root_of(network), data, network="testnet") == (
        f"rejected root/2.json: version is {version}, expected 2"
    )


def test_rejects_next_root_of_another_payload_type(network: RepositorySimulator) -> None:
    data = network.sign(HEAD_TYPE, payload_of(network.make_root(2, keys=["k1"])), ["k1"])
    message = rejection(verify_next_root, root_of(network), data, network="testnet")
    assert message == (
        f"rejected root/2.json: payloadType is {HEAD_TYPE!r}, expected {ROOT_TYPE!r}"
    )


def test_rejects_next_root_over_the_size_limit(network: RepositorySimulator) -> None:
    data = network.make_root(2, keys=["k1"])
    small = TrustLimits(root_max_bytes=len(data) - 1)
    assert rejection(verify_next_root, root_of(network), data, network="testnet", limits=small) == (
        f"rejected root/2.json: larger than the {len(data) - 1}-byte limit"
    )


def test_only_the_newest_root_must_be_fresh(network: RepositorySimulator) -> None:
    network.make_root(1, keys=["k1"], expires_in=-86400)
    old = root_of(network)
    assert rejection(check_root_fresh, old, now=NOW) == (
        f"rejected root/1.json: expired at {format_time(NOW - 86400)}"
    )
    new = verify_next_root(
        old, network.make_root(2, keys=["k1"]), network="testnet"
    ).root  # an expired root may still vouch for its successor
    check_root_fresh(new, now=NOW)


# ---- head -------------------------------------------------------------------------------


def test_accepts_a_valid_head(network: RepositorySimulator) -> None:
    release = network.release()
    verified = verify_head(
        root_of(network),
        release.head,
        network="testnet",
        now=NOW,
        last_serial=0,
        last_digest=None,
    )
    assert verified.head.serial == 1
    assert verified.head.config_digest == release.digest
    assert verified.signed_by == (network.keyid("k1"),)
    assert verified.envelope == release.head


def test_rejects_head_signed_by_unknown_key(network: RepositorySimulator) -> None:
    release = network.release(signers=["stranger"])
    assert rejection(head_of, network, release) == (
        "rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1"
    )


def test_rejects_head_with_one_payload_byte_changed(network: RepositorySimulator) -> None:
    release = network.release()
    payload = bytearray(payload_of(release.head))
    payload[-2] ^= 0x01
    tampered = Release(
        serial=1,
        digest=release.digest,
        head=replace_payload(release.head, bytes(payload)),
        snapshot=release.snapshot,
        snapshot_payload=release.snapshot_payload,
    )
    assert rejection(head_of, network, tampered).startswith("rejected head.json: 0 valid")


def test_counts_distinct_keys_towards_the_threshold() -> None:
    network = RepositorySimulator(now=NOW, root_keys=("k1", "k2", "k3"), threshold=2)
    root = root_of(network)
    assert head_of(network, network.release(signers=["k3", "k1"]), root=root).serial == 1
    twice = network.release(signers=["k1", "k1"])
    assert rejection(head_of, network, twice, root=root) == (
        "rejected head.json: 1 valid signature(s) by trusted keys, threshold is 2"
    )


def test_checks_the_threshold_before_the_payload(network: RepositorySimulator) -> None:
    release = network.release(signers=["stranger"], mutate_head=lambda h: h.update(extra=1))
    assert "valid signature" in rejection(head_of, network, release)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(network="mainnet"), "network is mainnet, this node is on testnet"),
        (
            lambda h: h.update(extra=True),
            "payload does not match the head schema: (top level): "
            "Additional properties are not allowed ('extra' was unexpected)",
        ),
        (
            lambda h: h.pop("expires"),
            "payload does not match the head schema: (top level): 'expires' is a required property",
        ),
        (
            lambda h: h.update(expires="2025-13-01T00:00:00Z"),
            "payload does not match the head schema: expires: "
            "'2025-13-01T00:00:00Z' is not a 'date-time'",
        ),
    ],
)
def test_rejects_head_payload_outside_the_contract(
    network: RepositorySimulator, edit: Any, message: str
) -> None:
    release = network.release(mutate_head=edit)
    assert rejection(head_of, network, release) == f"rejected head.json: {message}"


def test_rejects_head_with_duplicate_keys(network: RepositorySimulator) -> None:
    release = network.release(head_bytes=lambda b: b[:-1] + b',"serial":1}')
    assert rejection(head_of, network, release) == (
        "rejected head.json: payload is duplicate key 'serial'"
    )


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_rejects_head_with_non_finite_numbers(
    network: RepositorySimulator, constant: bytes
) -> None:
    release = network.release(
        head_bytes=lambda b: b.replace(b'"serial":1', b'"serial":' + constant)
    )
    assert rejection(head_of, network, release) == (
        f"rejected head.json: payload is {constant.decode()} is not allowed in JSON documents"
    )


def test_rejects_head_with_serial_above_2_to_the_53(network: RepositorySimulator) -> None:
    release = network.release(2**53 + 1)
    assert rejection(head_of, network, release) == (
        "rejected head.json: payload is integer out of range"
    )


def test_rejects_head_with_serial_written_as_a_float(network: RepositorySimulator) -> None:
    release = network.release(head_bytes=lambda b: b.replace(b'"serial":1', b'"serial":1.0'))
    assert rejection(head_of, network, release) == (
        "rejected head.json: payload does not match the head schema: serial: "
        "1.0 is not of type 'integer'"
    )


def test_expiry_allows_five_minutes_of_clock_skew(network: RepositorySimulator) -> None:
    release = network.release(head_expires_in=0)
    assert head_of(network, release, now=NOW + SKEW - 1).serial == 1
    assert rejection(head_of, network, release, now=NOW + SKEW) == (
        f"rejected head.json: expired at {format_time(NOW)}"
    )


def test_rejects_head_with_lower_serial(network: RepositorySimulator) -> None:
    release = network.release(41)
    assert rejection(
        head_of, network, release, last_serial=42, last_digest="sha256:" + "0" * 64
    ) == ("rejected head.json: serial 41 is below the last accepted 42")


def test_accepts_the_same_serial_only_with_the_same_digest(network: RepositorySimulator) -> None:
    release = network.release(42)
    assert head_of(network, release, last_serial=42, last_digest=release.digest).serial == 42
    other = "sha256:" + "1" * 64
    assert rejection(head_of, network, release, last_serial=42, last_digest=other) == (
        f"rejected head.json: serial 42 was already accepted with another digest ({other})"
    )


# ---- snapshot ---------------------------------------------------------------------------


def snapshot_of(
    network: RepositorySimulator, release: Release, *, head: Head | None = None, now: float = NOW
) -> Any:
    return verify_snapshot(
        root_of(network),
        release.snapshot,
        head=head or head_of(network, release),
        network="testnet",
        now=now,
    )


def test_accepts_a_snapshot_matching_its_head(network: RepositorySimulator) -> None:
    release = network.release()
    verified = snapshot_of(network, release)
    assert verified.digest == release.digest
    assert verified.payload == release.snapshot_payload
    assert verified.root_version == 1
    assert verified.snapshot.models[0].id == "tiny-llm:v1"


def test_rejects_snapshot_not_hashing_to_the_head_digest(network: RepositorySimulator) -> None:
    named = network.release()
    other = network.release(mutate_snapshot=lambda s: s["jobs"].update(max_queue=1))
    assert rejection(snapshot_of, network, other, head=head_of(network, named)) == (
        f"rejected {named.snapshot_path}: payload hashes to {other.digest}, "
        f"head.json names {named.digest}"
    )


def test_rejects_snapshot_whose_serial_differs_from_the_head(
    network: RepositorySimulator,
) -> None:
    release = network.release(5, head_serial=6)
    assert rejection(snapshot_of, network, release) == (
        f"rejected {release.snapshot_path}: serial 5 differs from head.json's 6"
    )


def test_rejects_expired_snapshot(network: RepositorySimulator) -> None:
    release = network.release(snapshot_expires_in=-SKEW)
    assert rejection(snapshot_of, network, release) == (
        f"rejected {release.snapshot_path}: expired at {format_time(NOW - SKEW)}"
    )


def test_rejects_snapshot_envelope_of_another_type(network: RepositorySimulator) -> None:
    release = network.release()
    head = head_of(network, release)
    relabelled = Release(
        serial=1,
        digest=release.digest,
        head=release.head,
        snapshot=network.sign(HEAD_TYPE, release.snapshot_payload, ["k1"]),
        snapshot_payload=release.snapshot_payload,
    )
    assert rejection(snapshot_of, network, relabelled, head=head) == (
        f"rejected {release.snapshot_path}: payloadType is {HEAD_TYPE!r}, "
        f"expected {SNAPSHOT_TYPE!r}"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["models"].append(dict(s["models"][0])),
            "a model id is listed twice",
        ),
        (
            lambda s: s["runtimes"].append(
                {"name": "r", "image": "r@sha256:" + "a" * 64, "models": ["ghost:v1"]}
            ),
            "runtime r mounts unknown model ghost:v1",
        ),
        (
            lambda s: s["runtimes"].extend(
                {
                    "name": name,
                    "image": "r@sha256:" + "a" * 64,
                    "ports": [{"container": 80, "host": 8080}],
                }
                for name in ("a", "b")
            ),
            "two runtimes publish the same host port",
        ),
        (
            lambda s: s["models"][0]["files"].append(dict(s["models"][0]["files"][0])),
            "model tiny-llm:v1 lists a file path twice",
        ),
    ],
)
def test_rejects_snapshot_that_contradicts_itself(
    network: RepositorySimulator, edit: Any, message: str
) -> None:
    release = network.release(mutate_snapshot=edit)
    assert rejection(snapshot_of, network, release) == (
        f"rejected {release.snapshot_path}: {message}"
    )


def test_a_known_snapshot_must_carry_the_head_serial(network: RepositorySimulator) -> None:
    release = network.release(3)
    head = head_of(network, release)
    check_stored_snapshot(head, stored_serial=3)
    assert rejection(check_stored_snapshot, head, stored_serial=2) == (
        f"rejected {release.snapshot_path}: serial 2 differs from head.json's 3"
    )


# ---- re-verification from history ---------------------------------------------------------


def test_reverify_ignores_expiry_but_not_signatures(network: RepositorySimulator) -> None:
    release = network.release(snapshot_expires_in=-30 * 86400)
    root = root_of(network)
    verified = reverify_snapshot(
        root,
        envelope_bytes=release.snapshot,
        payload_bytes=release.snapshot_payload,
        digest=release.digest,
        network="testnet",
    )
    assert verified.signed_by == (network.keyid("k1"),)

    forged = network.release(signers=["stranger"])
    assert rejection(
        reverify_snapshot,
        root,
        envelope_bytes=forged.snapshot,
        payload_bytes=forged.snapshot_payload,
        digest=forged.digest,
        network="testnet",
    ) == (f"rejected commit {forged.digest}: 0 valid signature(s) by trusted keys, threshold is 1")


def test_reverify_rejects_snapshot_file_differing_from_the_envelope(
    network: RepositorySimulator,
) -> None:
    release = network.release()
    assert rejection(
        reverify_snapshot,
        root_of(network),
        envelope_bytes=release.snapshot,
        payload_bytes=release.snapshot_payload + b" ",
        digest=release.digest,
        network="testnet",
    ) == (f"rejected commit {release.digest}: snapshot.json differs from the envelope's payload")


def test_reverify_rejects_a_wrong_digest_trailer(network: RepositorySimulator) -> None:
    release = network.release()
    wrong = "sha256:" + "2" * 64
    assert rejection(
        reverify_snapshot,
        root_of(network),
        envelope_bytes=release.snapshot,
        payload_bytes=release.snapshot_payload,
        digest=wrong,
        network="testnet",
    ) == (f"rejected commit {wrong}: snapshot.json hashes to {release.digest}")


def test_unknown_envelope_fields_do_not_change_the_verdict(network: RepositorySimulator) -> None:
    release = network.release()
    data = edit_envelope(release.head, lambda e: e.update(annotations={"note": "x"}))
    root = root_of(network)
    assert verify_head(
        root, data, network="testnet", now=NOW, last_serial=0, last_digest=None
    ).head == head_of(network, release)
