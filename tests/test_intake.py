"""Scenarios of docs/contract.md §3 through the real ``reconcile`` command and a loopback origin.

Each scenario publishes something with the ``simulator`` (the network's side), runs
``reconcile fetch`` against the ``file_server`` and checks the exit code, the one-line message
and, for every refusal, that the state repository and the trusted roots did not change.
Nothing here mocks httpx or pygit2.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.errors import OriginUnreachableError
from reconciler.intake.origin import Origin
from tests.support.fileserver import Fault, FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome
from tests.support.signing import (
    HEAD_TYPE,
    Release,
    RepositorySimulator,
    edit_envelope,
    format_time,
    payload_of,
    replace_payload,
    signature_entry,
)

REJECTED = 4
UNREACHABLE = 5
HEAD_LIMIT = 64 * 1024


@pytest.fixture
def first(node: NodeUnderTest, simulator: RepositorySimulator) -> Release:
    """Serial 1 published and accepted: every refusal below must leave the node on it."""
    release = simulator.publish()
    node.fetch().ok()
    return release


def assert_refused(
    node: NodeUnderTest, outcome: Outcome, *, code: int, message: str, before: Any
) -> None:
    assert outcome.exit_code == code, outcome
    assert outcome.error_line == message
    assert node.snapshot() == before


def refusal(
    node: NodeUnderTest,
    publish: Callable[[], object],
    *,
    code: int,
    message: str,
    **env: str,
) -> Outcome:
    """Publish something bad on top of the accepted state and check that it is refused."""
    before = node.snapshot()
    publish()
    outcome = node.fetch(**env)
    assert_refused(node, outcome, code=code, message=message, before=before)
    return outcome


# ---- the happy path ----------------------------------------------------------------------


def test_accepts_first_snapshot_and_makes_it_head(
    node: NodeUnderTest, simulator: RepositorySimulator
) -> None:
    release = simulator.publish()

    outcome = node.fetch().ok()

    assert outcome.stdout == f"snapshot 1 ({release.digest}) is the new HEAD\n"
    refs = node.refs()
    commit = refs["refs/heads/main"]
    assert refs[f"refs/snapshots/{release.hex}"] == commit
    assert refs["refs/reconciler/accepted"] == commit
    assert refs["HEAD"] == "-> refs/heads/main"
    assert node.git("cat-file", "blob", "main:snapshot.json").encode() == release.snapshot_payload
    report = node.status()
    assert report["head"]["digest"] == release.digest
    assert report["last_accepted"]["serial"] == 1


def test_accepts_a_later_serial_on_top(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    second = simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=3))

    node.fetch().ok()

    log = node.git("log", "--format=%(trailers:key=Serial,valueonly)", "main").split()
    assert log == ["2", "1"]
    assert node.status()["head"]["digest"] == second.digest


def test_console_script_exits_4_with_one_line(
    node: NodeUnderTest, simulator: RepositorySimulator, tmp_path: Path
) -> None:
    simulator.publish(signers=["stranger"])
    script = shutil.which("reconcile") or str(Path(sys.executable).with_name("reconcile"))

    done = subprocess.run(
        [script, "fetch"], capture_output=True, text=True, env=node.env, timeout=60
    )

    assert done.returncode == REJECTED
    assert done.stderr == (
        "reconcile: rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1\n"
    )


# ---- signatures (§3.3, §3.4) ---------------------------------------------------------------


def test_rejects_head_signed_by_unknown_key(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(signers=["stranger"]),
        code=REJECTED,
        message="rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1",
    )


def test_rejects_head_with_one_payload_byte_changed(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release()
    payload = payload_of(release.head)
    tampered = payload.replace(b'"serial":2', b'"serial":9')
    assert len(tampered) == len(payload) and tampered != payload

    def serve() -> None:
        simulator.write(release.snapshot_path, release.snapshot)
        simulator.write("head.json", replace_payload(release.head, tampered))

    refusal(
        node,
        serve,
        code=REJECTED,
        message="rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1",
    )


def test_rejects_snapshot_with_one_payload_byte_changed(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release()
    payload = release.snapshot_payload.replace(b'"max_queue":16', b'"max_queue":17')
    assert payload != release.snapshot_payload
    # The head names the tampered bytes, so only the signature can catch the change.
    honest = simulator.release(snapshot_bytes=lambda _original: payload)

    def serve() -> None:
        simulator.write(honest.snapshot_path, replace_payload(release.snapshot, payload))
        simulator.write("head.json", honest.head)

    refusal(
        node,
        serve,
        code=REJECTED,
        message=(
            f"rejected {honest.snapshot_path}: 0 valid signature(s) by trusted keys, threshold is 1"
        ),
    )


@pytest.fixture
def two_of_two(
    make_node: Callable[..., NodeUnderTest], file_server: FileServer
) -> tuple[NodeUnderTest, RepositorySimulator]:
    """A network whose root needs both k1 and k2, with serial 1 accepted."""
    network = RepositorySimulator(folder=file_server.root, root_keys=("k1", "k2"), threshold=2)
    node = make_node(file_server.url, network.roots[1], name="strict")
    network.publish()
    node.fetch().ok()
    return node, network


def test_rejects_head_below_threshold(
    two_of_two: tuple[NodeUnderTest, RepositorySimulator],
) -> None:
    node, network = two_of_two
    refusal(
        node,
        lambda: network.publish(signers=["k1"]),
        code=REJECTED,
        message="rejected head.json: 1 valid signature(s) by trusted keys, threshold is 2",
    )


def test_counts_the_same_key_signing_twice_once(
    two_of_two: tuple[NodeUnderTest, RepositorySimulator],
) -> None:
    node, network = two_of_two
    release = network.release(signers=["k1"])
    payload = payload_of(release.head)
    again = signature_entry(network.key("k1"), HEAD_TYPE, payload)

    def serve() -> None:
        network.write(release.snapshot_path, release.snapshot)
        network.write(
            "head.json", edit_envelope(release.head, lambda e: e["signatures"].append(again))
        )

    refusal(
        node,
        serve,
        code=REJECTED,
        message="rejected head.json: 1 valid signature(s) by trusted keys, threshold is 2",
    )


def test_accepts_head_at_threshold_with_a_bad_extra_signature(
    two_of_two: tuple[NodeUnderTest, RepositorySimulator],
) -> None:
    node, network = two_of_two
    release = network.release()
    junk = {"keyid": network.keyid("k1"), "sig": "AAAA"}

    network.serve(release, head=False)
    network.write(
        "head.json", edit_envelope(release.head, lambda e: e["signatures"].insert(0, junk))
    )

    node.fetch().ok()
    signed_by = node.git("log", "-1", "--format=%(trailers:key=Signed-By,valueonly)", "main")
    assert signed_by.strip() == ", ".join(sorted([network.keyid("k1"), network.keyid("k2")]))


# ---- envelope shape (§3.3) ------------------------------------------------------------------


def test_rejects_head_with_broken_base64(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release()

    def serve() -> None:
        broken = edit_envelope(release.head, lambda e: e.update(payload="not*base64!"))
        simulator.write("head.json", broken)

    before = node.snapshot()
    serve()
    outcome = node.fetch()
    assert outcome.exit_code == REJECTED
    assert re.fullmatch(r"rejected head\.json: bad base64 \(.+\)", outcome.error_line)
    assert node.snapshot() == before


def test_rejects_head_that_is_not_json(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    before = node.snapshot()
    simulator.write("head.json", b'{"payloadType": "application/vnd.resultity.head+json",')

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert re.fullmatch(
        r"rejected head\.json: envelope is not valid JSON \(.+\)", outcome.error_line
    )
    assert node.snapshot() == before


def test_rejects_head_whose_payload_is_not_json(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    before = node.snapshot()
    simulator.write("head.json", simulator.sign(HEAD_TYPE, b"serial: 2", ["k1"]))

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert re.fullmatch(
        r"rejected head\.json: payload is not valid JSON \(.+\)", outcome.error_line
    )
    assert node.snapshot() == before


def test_rejects_a_snapshot_envelope_served_as_head(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release()
    refusal(
        node,
        lambda: simulator.write("head.json", release.snapshot),
        code=REJECTED,
        message=(
            "rejected head.json: payloadType is 'application/vnd.resultity.snapshot+json', "
            "expected 'application/vnd.resultity.head+json'"
        ),
    )


# ---- payload (§3.5) -----------------------------------------------------------------------


def test_rejects_head_for_another_network(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(mutate_head=lambda h: h.update(network="mainnet")),
        code=REJECTED,
        message="rejected head.json: network is mainnet, this node is on testnet",
    )


def test_rejects_snapshot_for_another_network(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release(mutate_snapshot=lambda s: s.update(network="mainnet"))
    refusal(
        node,
        lambda: simulator.serve(release),
        code=REJECTED,
        message=f"rejected {release.snapshot_path}: network is mainnet, this node is on testnet",
    )


def test_rejects_head_with_unknown_field(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(mutate_head=lambda h: h.update(policy="strict")),
        code=REJECTED,
        message=(
            "rejected head.json: payload does not match the head schema: (top level): "
            "Additional properties are not allowed ('policy' was unexpected)"
        ),
    )


def test_rejects_snapshot_with_unknown_nested_field(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release(mutate_snapshot=lambda s: s["jobs"].update(priority=1))
    refusal(
        node,
        lambda: simulator.serve(release),
        code=REJECTED,
        message=(
            f"rejected {release.snapshot_path}: payload does not match the snapshot schema: "
            "jobs: Additional properties are not allowed ('priority' was unexpected)"
        ),
    )


def test_rejects_snapshot_with_path_traversal(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    def escape(snapshot: dict[str, Any]) -> None:
        snapshot["models"][0]["files"][0]["path"] = "../x"

    release = simulator.release(mutate_snapshot=escape)
    before = node.snapshot()
    simulator.serve(release)

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert outcome.error_line.startswith(
        f"rejected {release.snapshot_path}: payload does not match the snapshot schema: "
        "models/0/files/0/path: '../x' does not match"
    )
    assert node.snapshot() == before


def test_rejects_head_with_serial_above_2_to_the_53(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(2**53 + 1),
        code=REJECTED,
        message="rejected head.json: payload is integer out of range",
    )


# ---- expiry (§3.6) ------------------------------------------------------------------------


def test_rejects_expired_head(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(head_expires_in=-3600),
        code=REJECTED,
        message=f"rejected head.json: expired at {format_time(simulator.now - 3600)}",
    )


def test_rejects_expired_snapshot(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release(snapshot_expires_in=-3600)
    refusal(
        node,
        lambda: simulator.serve(release),
        code=REJECTED,
        message=(
            f"rejected {release.snapshot_path}: expired at {format_time(simulator.now - 3600)}"
        ),
    )


def test_accepts_head_expired_within_the_clock_skew_allowance(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    simulator.publish(head_expires_in=-60)

    node.fetch().ok()

    assert node.status()["last_accepted"]["serial"] == 2


# ---- serials (§3.7) -----------------------------------------------------------------------


def test_rejects_head_with_lower_serial(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    node.fetch().ok()

    refusal(
        node,
        lambda: simulator.write("head.json", first.head),
        code=REJECTED,
        message="rejected head.json: serial 1 is below the last accepted 2",
    )


def test_rejects_same_serial_with_another_digest(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.publish(1, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2)),
        code=REJECTED,
        message=(
            "rejected head.json: serial 1 was already accepted with another digest "
            f"({first.digest})"
        ),
    )


def test_ingesting_the_same_digest_again_changes_nothing(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    before = node.snapshot()
    # A re-signed head: same serial and digest, later expiry, so no 304 can short-cut it.
    later = format_time(simulator.now + 7 * 86400)
    again = simulator.release(1, mutate_head=lambda h: h.update(expires=later))
    assert again.digest == first.digest and again.head != first.head
    simulator.serve(again)

    outcome = node.fetch().ok()

    assert outcome.stdout == f"snapshot 1 ({first.digest}) is current\n"
    assert node.snapshot() == before
    assert node.git("rev-list", "--count", "--all").strip() == "1"


def test_anti_rollback_survives_losing_the_record_and_a_git_reset(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    second = simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    node.fetch().ok()
    first_commit = node.git("rev-parse", f"refs/snapshots/{first.hex}").strip()
    second_commit = node.git("rev-parse", f"refs/snapshots/{second.hex}").strip()

    (node.state_dir / "node-state.json").unlink()
    node.git("reset", "--hard", first_commit)
    assert node.git("rev-parse", "main").strip() == first_commit
    assert node.git("rev-parse", "refs/reconciler/accepted").strip() == second_commit

    refusal(
        node,
        lambda: simulator.write("head.json", first.head),
        code=REJECTED,
        message="rejected head.json: serial 1 is below the last accepted 2",
    )
    refusal(
        node,
        lambda: simulator.publish(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=9)),
        code=REJECTED,
        message=(
            "rejected head.json: serial 2 was already accepted with another digest "
            f"({second.digest})"
        ),
    )


# ---- snapshot against head (§3.8) ---------------------------------------------------------


def test_rejects_snapshot_that_does_not_hash_to_the_head_digest(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    named = simulator.release()
    other = simulator.release(mutate_snapshot=lambda s: s["jobs"].update(max_queue=5))

    def serve() -> None:
        simulator.write(named.snapshot_path, other.snapshot)
        simulator.write("head.json", named.head)

    refusal(
        node,
        serve,
        code=REJECTED,
        message=(
            f"rejected {named.snapshot_path}: payload hashes to {other.digest}, "
            f"head.json names {named.digest}"
        ),
    )


def test_rejects_snapshot_whose_serial_differs_from_the_head(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release(2, head_serial=3)
    refusal(
        node,
        lambda: simulator.serve(release),
        code=REJECTED,
        message=f"rejected {release.snapshot_path}: serial 2 differs from head.json's 3",
    )


def test_rejects_head_with_higher_serial_naming_a_stored_snapshot(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    # The snapshot is already in the history, so it is not fetched again; its serial must
    # still agree with the head's, or the floor would rise to a serial nobody signed a
    # snapshot for.
    release = simulator.release(2, head_digest=first.digest)
    before_record = node.record()
    refusal(
        node,
        lambda: simulator.serve(release, snapshot=False),
        code=REJECTED,
        message=f"rejected {first.snapshot_path}: serial 1 differs from head.json's 2",
    )
    assert node.record()["last_serial"] == before_record["last_serial"] == 1


# ---- size limits and transport (§3.1, exit 5) ---------------------------------------------


def test_aborts_a_head_body_that_never_ends(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release, file_server: FileServer
) -> None:
    before = node.snapshot()
    file_server.faults.set("/head.json", Fault(endless=True))

    tracemalloc.start()
    try:
        outcome = node.fetch()
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert_refused(
        node,
        outcome,
        code=REJECTED,
        message=f"rejected head.json: larger than the {HEAD_LIMIT}-byte limit",
        before=before,
    )
    assert outcome.seconds < 5
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while reading a 64 KiB document"
    sent = file_server.stats.body_bytes("/head.json")
    time.sleep(0.3)
    assert file_server.stats.body_bytes("/head.json") == sent, "the connection was not closed"


def test_rejects_head_declared_larger_than_the_limit(
    node: NodeUnderTest, first: Release, file_server: FileServer
) -> None:
    refusal(
        node,
        lambda: file_server.faults.set("/head.json", Fault(body=b" " * (HEAD_LIMIT + 1))),
        code=REJECTED,
        message=f"rejected head.json: larger than the {HEAD_LIMIT}-byte limit",
    )


def test_gives_up_on_a_server_that_never_answers(
    node: NodeUnderTest, first: Release, file_server: FileServer
) -> None:
    before = node.snapshot()
    file_server.faults.set("/head.json", Fault(stall_headers=True))

    outcome = node.fetch(RECONCILER_FETCH_TIMEOUT_S="1")

    assert_refused(
        node,
        outcome,
        code=UNREACHABLE,
        message="origin unreachable fetching head.json: timed out (ReadTimeout)",
        before=before,
    )
    assert outcome.seconds < 4


def test_gives_up_on_a_snapshot_that_stalls_midway(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release, file_server: FileServer
) -> None:
    release = simulator.release()
    file_server.faults.set("/" + release.snapshot_path, Fault(stall_after=100))

    outcome = refusal(
        node,
        lambda: simulator.serve(release),
        code=UNREACHABLE,
        message=f"origin unreachable fetching {release.snapshot_path}: timed out (ReadTimeout)",
        RECONCILER_FETCH_TIMEOUT_S="1",
    )
    assert outcome.seconds < 4


def test_gives_up_on_a_trickling_head_at_the_deadline(
    node: NodeUnderTest, first: Release, simulator: RepositorySimulator, file_server: FileServer
) -> None:
    release = simulator.release()
    simulator.serve(release)
    assert len(release.head) * 0.05 > 10  # the whole trickle would take far longer
    file_server.faults.set("/head.json", Fault(trickle_s=0.05))
    before = node.snapshot()

    outcome = node.fetch(RECONCILER_FETCH_TIMEOUT_S="1")

    assert_refused(
        node,
        outcome,
        code=UNREACHABLE,
        message="origin unreachable fetching head.json: not received within 1 s",
        before=before,
    )
    assert outcome.seconds < 4


@pytest.mark.parametrize("status", [404, 500, 503])
def test_head_answered_with_an_error_status_is_unreachable(
    node: NodeUnderTest, first: Release, file_server: FileServer, status: int
) -> None:
    refusal(
        node,
        lambda: file_server.faults.set("/head.json", status=status),
        code=UNREACHABLE,
        message=(
            f"origin unreachable fetching head.json: HTTP {status} from {file_server.url}head.json"
        ),
    )


def test_missing_snapshot_is_unreachable(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    release = simulator.release()
    refusal(
        node,
        lambda: simulator.serve(release, snapshot=False),
        code=UNREACHABLE,
        message=(
            f"origin unreachable fetching {release.snapshot_path}: "
            f"HTTP 404 from {node.status()['origin']}{release.snapshot_path}"
        ),
    )


def test_server_error_on_the_next_root_is_unreachable_not_the_end_of_the_chain(
    node: NodeUnderTest, first: Release, file_server: FileServer
) -> None:
    refusal(
        node,
        lambda: file_server.faults.set("/root/2.json", status=500),
        code=UNREACHABLE,
        message=(
            f"origin unreachable fetching root/2.json: HTTP 500 from {file_server.url}root/2.json"
        ),
    )


def test_forbidden_next_root_ends_the_chain(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release, file_server: FileServer
) -> None:
    file_server.faults.set("/root/2.json", status=403)
    simulator.publish()

    node.fetch().ok()

    assert file_server.stats.statuses("/root/2.json")[-1] == 403


def test_redirect_loop_is_unreachable(
    node: NodeUnderTest, first: Release, file_server: FileServer
) -> None:
    file_server.stats.reset()
    refusal(
        node,
        lambda: file_server.faults.set("/head.json", redirect="/head.json"),
        code=UNREACHABLE,
        message="origin unreachable fetching head.json: more than 5 redirects",
    )
    assert file_server.stats.requests("/head.json") == 6


def test_follows_a_redirect_to_a_mirror(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release, file_server: FileServer
) -> None:
    release = simulator.release()
    simulator.serve(release, head=False)
    simulator.write("mirror/head.json", release.head)
    file_server.faults.set("/head.json", redirect=file_server.url_for("mirror/head.json"))

    node.fetch().ok()

    assert node.status()["head"]["digest"] == release.digest


def test_refuses_redirect_from_https_to_http() -> None:
    with Origin("https://origin.example.invalid/config/") as origin:
        with pytest.raises(OriginUnreachableError, match="refused redirect to http://"):
            origin._redirect_target(
                "head.json",
                "https://origin.example.invalid/config/head.json",
                "http://origin.example.invalid/config/head.json",
            )
        assert (
            origin._redirect_target(
                "head.json", "https://origin.example.invalid/config/head.json", "/b/head.json"
            )
            == "https://origin.example.invalid/b/head.json"
        )


def test_refuses_redirect_to_another_scheme() -> None:
    with Origin("http://origin.example.invalid/") as origin:
        for target in ("file:///etc/passwd", "ftp://origin.example.invalid/head.json"):
            with pytest.raises(OriginUnreachableError, match="refused redirect"):
                origin._redirect_target("head.json", "http://origin.example.invalid/", target)
        with pytest.raises(OriginUnreachableError, match="redirect without a Location"):
            origin._redirect_target("head.json", "http://origin.example.invalid/", None)


# ---- root rotation (§3.2) -----------------------------------------------------------------


def test_accepts_rotated_root_and_then_a_head_signed_only_by_the_new_key(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    root2 = simulator.make_root(2, keys=["k2"], signers=["k1", "k2"])
    release = simulator.publish(signers=["k2"])

    node.fetch().ok()

    assert node.roots()["2.json"] == root2
    trailers = node.git("log", "-1", "--format=%(trailers:only,unfold)", "main")
    assert f"Root-Version: 2\nSigned-By: {simulator.keyid('k2')}\n" in trailers
    assert node.status()["head"]["digest"] == release.digest


def test_rejects_head_signed_by_a_key_rotated_out(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    simulator.make_root(2, keys=["k2"], signers=["k1", "k2"])
    before = node.snapshot()
    simulator.publish(signers=["k1"])

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert outcome.error_line == (
        "rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1"
    )
    assert node.refs() == before.refs
    assert set(node.roots()) == {"1.json", "2.json"}  # root 2 itself was valid


def test_rejects_root_signed_only_by_its_new_keys(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    def rotate() -> None:
        simulator.make_root(2, keys=["k2"], signers=["k2"])
        simulator.publish(signers=["k2"])

    refusal(
        node,
        rotate,
        code=REJECTED,
        message=(
            "rejected root/2.json: 0 valid signature(s) by the previous root's keys, threshold is 1"
        ),
    )


def test_rejects_root_not_signed_by_its_own_keys(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.make_root(2, keys=["k2"], signers=["k1"]),
        code=REJECTED,
        message="rejected root/2.json: 0 valid signature(s) by its own keys, threshold is 1",
    )


def test_rejects_root_with_a_skipped_version(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    def skip() -> None:
        envelope = simulator.make_root(3, keys=["k1"], write=False)
        simulator.write("root/2.json", envelope)

    refusal(
        node,
        skip,
        code=REJECTED,
        message="rejected root/2.json: version is 3, expected 2",
    )


def test_rejects_when_the_newest_root_has_expired(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    refusal(
        node,
        lambda: simulator.make_root(2, keys=["k1"], expires_in=-3600),
        code=REJECTED,
        message=f"rejected root/2.json: expired at {format_time(simulator.now - 3600)}",
    )


def test_an_expired_root_is_replaced_by_a_fresh_rotation(
    make_node: Callable[..., NodeUnderTest], file_server: FileServer
) -> None:
    network = RepositorySimulator(folder=file_server.root)
    network.make_root(1, keys=["k1"], expires_in=-3600)
    node = make_node(file_server.url, network.roots[1])
    network.publish()
    assert node.fetch().error_line.startswith("rejected root/1.json: expired at ")

    network.make_root(2, keys=["k1"])
    node.fetch().ok()


def test_rejects_oversized_next_root(
    node: NodeUnderTest, first: Release, file_server: FileServer
) -> None:
    refusal(
        node,
        lambda: file_server.faults.set("/root/2.json", body=b"{" * (HEAD_LIMIT + 1)),
        code=REJECTED,
        message=f"rejected root/2.json: larger than the {HEAD_LIMIT}-byte limit",
    )


# ---- what the operator sees, and conditional polls ----------------------------------------


def test_status_shows_the_last_rejection_until_a_fetch_succeeds(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release, file_server: FileServer
) -> None:
    simulator.publish(signers=["stranger"])
    line = node.fetch().error_line

    report = node.status()
    assert report["last_rejection"]["message"] == line
    assert report["last_rejection"]["kind"] == "rejected"
    assert f"rejected    {line}" in node.status_text()
    # An unreachable origin in between does not hide the rejection.
    file_server.faults.set("/head.json", status=503, times=1)
    unreachable = node.fetch().error_line
    report = node.status()
    assert report["last_rejection"]["message"] == line
    assert report["last_error"]["message"] == unreachable

    simulator.publish(2)
    node.fetch().ok()

    report = node.status()
    assert report["last_rejection"] is None
    assert report["last_error"] is None
    assert "rejected" not in node.status_text()


def test_polls_head_conditionally_with_its_etag(
    node: NodeUnderTest, simulator: RepositorySimulator, file_server: FileServer
) -> None:
    release = simulator.publish()
    node.fetch().ok()
    etag = file_server.stats.headers("/head.json")  # the first request carried none
    assert "if-none-match" not in etag[0]

    outcome = node.fetch().ok()

    assert outcome.stdout == "head.json not modified\n"
    assert file_server.stats.statuses("/head.json") == [200, 304]
    assert file_server.stats.headers("/head.json")[1]["if-none-match"]
    assert file_server.stats.requests("/" + release.snapshot_path) == 1

    simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=1))
    node.fetch().ok()
    assert file_server.stats.statuses("/head.json") == [200, 304, 200]


# ---- file:// origins ----------------------------------------------------------------------


def test_file_origin_accepts_rotates_and_reports_missing_head(
    make_node: Callable[..., NodeUnderTest], tmp_path: Path
) -> None:
    folder = tmp_path / "air gapped"
    network = RepositorySimulator(folder=folder)
    node = make_node(folder.as_uri() + "/", network.roots[1])

    outcome = node.fetch()
    assert outcome.exit_code == UNREACHABLE
    assert outcome.error_line == (
        f"origin unreachable fetching head.json: {folder / 'head.json'} does not exist"
    )

    network.make_root(2, keys=["k2"], signers=["k1", "k2"])
    release = network.publish(signers=["k2"])
    node.fetch().ok()
    assert node.status()["head"]["digest"] == release.digest
    assert set(node.roots()) == {"1.json", "2.json"}


def test_file_origin_enforces_the_size_limit(
    make_node: Callable[..., NodeUnderTest], tmp_path: Path
) -> None:
    folder = tmp_path / "origin"
    network = RepositorySimulator(folder=folder)
    node = make_node(folder.as_uri(), network.roots[1])
    network.write("head.json", b" " * (HEAD_LIMIT + 1))

    outcome = node.fetch()

    assert outcome.exit_code == REJECTED
    assert outcome.error_line == f"rejected head.json: larger than the {HEAD_LIMIT}-byte limit"


def test_root_walk_is_capped_per_fetch_and_resumes_on_the_next(
    make_node: Callable[..., NodeUnderTest], tmp_path: Path
) -> None:
    folder = tmp_path / "origin"
    network = RepositorySimulator(folder=folder)
    node = make_node(folder.as_uri(), network.roots[1])
    for version in range(2, 36):  # 34 rotations, each to a new key
        network.make_root(version, keys=[f"k{version}"], signers=[f"k{version - 1}", f"k{version}"])
    network.publish(signers=["k35"])

    capped = node.fetch()

    assert capped.exit_code == REJECTED
    assert capped.error_line == (
        "rejected head.json: 0 valid signature(s) by trusted keys, threshold is 1"
    )
    assert max(int(name.removesuffix(".json")) for name in node.roots()) == 33
    node.fetch().ok()
    assert max(int(name.removesuffix(".json")) for name in node.roots()) == 35


def test_fetch_during_an_operator_hold_stores_the_snapshot_as_waiting(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    node.fetch().ok()
    main = node.git("rev-parse", "main").strip()
    held = node.git("rev-parse", f"refs/snapshots/{first.hex}").strip()
    node.git("checkout", "-q", "--detach", held)

    third = simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=3))
    outcome = node.fetch().ok()

    assert outcome.stdout == (
        f"snapshot 3 ({third.digest}) stored, waiting: hold (HEAD moved with git to {held[:12]})\n"
    )
    refs = node.refs()
    assert (refs["HEAD"], refs["refs/heads/main"]) == (held, main)
    assert refs[f"refs/snapshots/{third.hex}"] == refs["refs/reconciler/accepted"]
    report = node.status()
    assert report["hold"]["active"]
    assert report["waiting"] == [{"digest": third.digest, "serial": 3}]


def test_a_head_refetched_during_a_hold_is_decided_again_and_still_waits(
    node: NodeUnderTest, simulator: RepositorySimulator, first: Release
) -> None:
    simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    node.fetch().ok()
    held = node.git("rev-parse", f"refs/snapshots/{first.hex}").strip()
    node.git("checkout", "-q", "--detach", held)
    third = simulator.publish(mutate_snapshot=lambda s: s["jobs"].update(max_queue=3))
    node.fetch().ok()
    before = node.snapshot()
    # The same snapshot under a re-signed head (another ETag, so no 304 short-cuts it).
    later = format_time(simulator.now + 3 * 86400)
    simulator.serve(
        simulator.release(
            3,
            mutate_snapshot=lambda s: s["jobs"].update(max_queue=3),
            mutate_head=lambda h: h.update(expires=later),
        )
    )

    outcome = node.fetch().ok()

    assert outcome.stdout == (
        f"snapshot 3 ({third.digest}) stored, waiting: hold (HEAD moved with git to {held[:12]})\n"
    )
    assert node.snapshot() == before
    assert node.status()["waiting"] == [{"digest": third.digest, "serial": 3}]
    assert node.status()["last_accepted"]["head_expires"] == later
