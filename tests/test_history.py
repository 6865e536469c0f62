"""The state repository (docs/contract.md §4) in real git repositories, read with stock git."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.core.errors import HistoryError
from reconciler.core.rollout import Admission, Position
from reconciler.history.repo import History, StoredSnapshot
from reconciler.history.trailers import CommitInfo, commit_info, commit_message
from tests.support.origin_fixtures import NodeUnderTest, repository_refs, stock_git
from tests.support.signing import Release, RepositorySimulator, base_snapshot

NOW = 1_750_000_000.0


@pytest.fixture
def network() -> RepositorySimulator:
    return RepositorySimulator(now=NOW, root_keys=("k1", "k2"), threshold=2)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "snapshots"


@pytest.fixture
def history(repo: Path) -> History:
    return History.open(repo, create=True)


def stored(
    network: RepositorySimulator, release: Release, *, root_version: int = 1
) -> StoredSnapshot:
    return StoredSnapshot(
        digest=release.digest,
        serial=release.serial,
        network="testnet",
        root_version=root_version,
        signed_by=(network.keyid("k2"), network.keyid("k1")),  # unsorted on purpose
        payload=release.snapshot_payload,
        envelope=release.snapshot,
    )


def git(repo: Path, *args: str) -> str:
    return stock_git(repo, *args).decode("utf-8")


def test_commit_tree_holds_the_payload_and_envelope_bytes_exactly(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    release = network.release()

    oid, moved = history.store(stored(network, release), advance=True)

    assert moved
    assert stock_git(repo, "cat-file", "blob", f"{oid}:snapshot.json") == release.snapshot_payload
    assert stock_git(repo, "cat-file", "blob", f"{oid}:envelope.json") == release.snapshot
    entries = git(repo, "ls-tree", oid).splitlines()
    assert [line.split()[0] for line in entries] == ["100644", "100644"]
    assert [line.split("\t")[1] for line in entries] == ["envelope.json", "snapshot.json"]


def test_git_log_shows_the_contract_trailers(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    release = network.release(7)
    history.store(stored(network, release, root_version=3), advance=True)

    trailers = git(repo, "log", "-1", "--format=%(trailers:only,unfold)")

    signers = ", ".join(sorted([network.keyid("k1"), network.keyid("k2")]))
    assert trailers.strip().splitlines() == [
        f"Config-Digest: {release.digest}",
        "Serial: 7",
        "Network: testnet",
        "Root-Version: 3",
        f"Signed-By: {signers}",
        "Reason: fetch",
    ]
    assert git(repo, "log", "-1", "--format=%(trailers:key=Serial,valueonly)").strip() == "7"


def test_refs_name_the_commit_and_the_repository_is_sound(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    first = network.release(1)
    second = network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    one, _ = history.store(stored(network, first), advance=True)
    two, _ = history.store(stored(network, second), advance=True)
    history.append_note(two, "receipt line")

    refs = dict(
        line.split(" ", 1)[::-1]
        for line in git(repo, "for-each-ref", "--format=%(objectname) %(refname)").splitlines()
    )
    assert refs["refs/heads/main"] == two
    assert refs[f"refs/snapshots/{first.hex}"] == one
    assert refs[f"refs/snapshots/{second.hex}"] == two
    assert refs["refs/reconciler/accepted"] == two
    assert "refs/notes/applied" in refs
    assert git(repo, "rev-parse", "main^").strip() == one
    fsck = stock_git(repo, "fsck", "--strict", "--no-dangling", "--full")
    assert fsck == b""
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"


def test_storing_the_same_digest_twice_changes_nothing(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    release = network.release()
    oid, _ = history.store(stored(network, release), advance=True)
    before = repository_refs(repo)

    again, moved = history.store(stored(network, release), advance=True)

    assert (again, moved) == (oid, False)
    assert repository_refs(repo) == before
    assert git(repo, "rev-list", "--count", "--all").strip() == "1"


def test_a_waiting_snapshot_gets_its_ref_but_main_stays(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    one, _ = history.store(stored(network, network.release(1)), advance=True)
    later = network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))

    two, moved = history.store(stored(network, later), advance=False)

    assert not moved
    assert history.main_tip() == one == history.head_oid()
    assert history.snapshot_ref(later.digest) == two
    assert git(repo, "rev-parse", "refs/reconciler/accepted").strip() == two
    assert git(repo, "status", "--porcelain") == ""


def test_the_accepted_floor_never_goes_down(history: History, network: RepositorySimulator) -> None:
    high, _ = history.store(stored(network, network.release(5)), advance=True)
    low = network.release(3, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    history.store(stored(network, low), advance=False)

    floor = history.accepted_floor()
    assert floor is not None
    assert (floor.oid, floor.serial) == (high, 5)


def test_the_floor_survives_a_git_reset_of_main(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    one, _ = history.store(stored(network, network.release(1)), advance=True)
    release = network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    two, _ = history.store(stored(network, release), advance=True)

    git(repo, "reset", "-q", "--hard", one)

    reopened = History.open(repo)
    assert reopened.head_oid() == one
    floor = reopened.accepted_floor()
    assert floor is not None and floor.serial == 2 and floor.oid == two


def test_head_follows_an_operator_checkout_and_advance_reattaches_it(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    one, _ = history.store(stored(network, network.release(1)), advance=True)
    two, _ = history.store(
        stored(network, network.release(2, mutate_snapshot=lambda s: s.update(runtimes=[]))),
        advance=True,
    )
    git(repo, "checkout", "-q", "--detach", one)
    assert history.head_oid() == one and history.head_is_detached()

    release = network.release(3, mutate_snapshot=lambda s: s["jobs"].update(max_queue=3))
    three, moved = history.store(stored(network, release), advance=True)

    assert moved and history.head_oid() == three
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert git(repo, "rev-parse", "main^").strip() == two
    assert git(repo, "status", "--porcelain") == ""
    assert (repo / "snapshot.json").read_bytes() == release.snapshot_payload


def test_log_walks_first_parents_newest_first(
    history: History, network: RepositorySimulator
) -> None:
    for serial in (1, 2, 3):
        body = base_snapshot()
        body["jobs"]["max_queue"] = serial
        history.store(stored(network, network.release(serial, body=body)), advance=True)

    assert [info.serial for info in history.log()] == [3, 2, 1]
    assert [info.serial for info in history.log(limit=2)] == [3, 2]
    newest = next(history.log())
    assert newest.reason == "fetch" and newest.root_version == 1
    assert newest.signed_by == tuple(sorted([network.keyid("k1"), network.keyid("k2")]))


def test_resolve_finds_digest_prefix_serial_and_git_revisions(
    history: History, network: RepositorySimulator
) -> None:
    first = network.release(1)
    one, _ = history.store(stored(network, first), advance=True)
    two, _ = history.store(
        stored(
            network, network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
        ),
        advance=True,
    )

    assert history.resolve(first.digest) == one
    assert history.resolve(first.hex[:8]) == one
    assert history.resolve("1") == one
    assert history.resolve("main~1") == one
    assert history.resolve("HEAD") == two
    with pytest.raises(HistoryError, match="no snapshot matches"):
        history.resolve("no-such-revision")


def test_recommit_makes_a_new_commit_with_the_same_tree_and_another_reason(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    one, _ = history.store(stored(network, network.release(1)), advance=True)
    history.store(
        stored(
            network, network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
        ),
        advance=True,
    )

    back = history.recommit(one, reason="rollback")

    assert history.main_tip() == back
    assert history.info(back).reason == "rollback"
    assert history.info(back).serial == 1
    assert git(repo, "rev-parse", f"{back}^{{tree}}") == git(repo, "rev-parse", f"{one}^{{tree}}")
    assert git(repo, "log", "-1", "--format=%s").startswith("Roll back to snapshot 1 ")


def test_receipt_notes_are_shown_by_git_log(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    oid, _ = history.store(stored(network, network.release()), advance=True)

    history.append_note(oid, "first attempt")
    history.append_note(oid, "second attempt")

    assert history.notes(oid) == ["first attempt", "second attempt"]
    assert history.noted_commits() == [oid]
    shown = git(repo, "log", "--notes=applied", "-1", "--format=%N")
    assert shown.split() == ["first", "attempt", "second", "attempt"]


def test_a_commit_made_by_hand_is_not_mistaken_for_a_snapshot(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    history.store(stored(network, network.release()), advance=True)
    git(repo, "commit", "-q", "--allow-empty", "-m", "operator notes")
    foreign = git(repo, "rev-parse", "HEAD").strip()

    with pytest.raises(HistoryError, match="lacks the reconciler trailers"):
        history.info(foreign)
    git(repo, "rm", "-q", "snapshot.json")
    git(repo, "commit", "-q", "-m", "drop it\n\nSerial: 1")
    with pytest.raises(HistoryError, match=r"lacks snapshot\.json"):
        history.blobs(git(repo, "rev-parse", "HEAD").strip())


def test_opening_a_missing_repository_is_a_history_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no state repository"):
        History.open(tmp_path / "absent")
    with pytest.raises(HistoryError, match="no commit"):
        History.open(tmp_path / "made", create=True).info("0" * 40)


def test_a_commit_message_reads_back_as_the_trailers_it_was_written_with() -> None:
    snapshot = StoredSnapshot(
        digest="sha256:" + "ab" * 32,
        serial=7,
        network="testnet",
        root_version=2,
        signed_by=("k2", "k1"),
        payload=b"{}",
        envelope=b"{}",
    )
    message = commit_message(snapshot, reason="rollback")

    assert message.splitlines()[0] == "Roll back to snapshot 7 (sha256:abababababab…)"
    assert commit_info(message, oid="c" * 40, time=5) == CommitInfo(
        oid="c" * 40,
        digest="sha256:" + "ab" * 32,
        serial=7,
        network="testnet",
        root_version=2,
        signed_by=("k1", "k2"),
        reason="rollback",
        time=5,
    )
    with pytest.raises(HistoryError, match="commit cccccccccccc lacks the reconciler trailers"):
        commit_info("operator notes\n\nSerial: seven\n", oid="c" * 40, time=5)


WAVE_3 = Admission(wave=3, wave_at=1_764_669_600, position=Position(3721))  # 2025-12-02T10:00Z


def test_a_commit_through_a_rollout_wave_carries_the_rollout_trailers(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    release = network.release(7)
    snapshot = replace(stored(network, release), admission=WAVE_3)

    oid, _ = history.store(snapshot, advance=True)

    trailers = git(repo, "log", "-1", "--format=%(trailers:only,unfold)").strip().splitlines()
    assert trailers[-4:] == [
        "Reason: fetch",
        "Rollout-Wave: 3",
        "Rollout-Wave-At: 2025-12-02T10:00:00Z",
        "Rollout-Position: 37.21",
    ]
    assert history.info(oid).admission == WAVE_3
    assert git(repo, "log", "-1", "--format=%(trailers:key=Rollout-Wave,valueonly)").strip() == "3"


def test_advancing_to_a_snapshot_that_waited_for_its_wave_records_the_wave(
    history: History, repo: Path, network: RepositorySimulator
) -> None:
    one, _ = history.store(stored(network, network.release(1)), advance=True)
    later = network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    waiting, _ = history.store(stored(network, later), advance=False)
    assert history.info(waiting).admission is None  # it waited: no wave yet

    tip = history.advance_to(waiting, admission=WAVE_3)

    assert tip != waiting and history.main_tip() == tip == history.head_oid()
    info = history.info(tip)
    assert (info.serial, info.reason, info.admission) == (2, "fetch", WAVE_3)
    assert git(repo, "rev-parse", "main^").strip() == one
    tree = git(repo, "rev-parse", f"{waiting}^{{tree}}")
    assert git(repo, "rev-parse", f"{tip}^{{tree}}") == tree
    assert history.snapshot_ref(later.digest) == waiting
    # A rollback to it later is not "through a wave": the new commit has no Rollout trailers.
    assert history.info(history.recommit(one, reason="rollback")).admission is None
    assert history.info(history.recommit(tip, reason="rollback")).admission is None


def test_advancing_without_a_wave_still_fast_forwards(
    history: History, network: RepositorySimulator
) -> None:
    history.store(stored(network, network.release(1)), advance=True)
    later = network.release(2, mutate_snapshot=lambda s: s["jobs"].update(max_queue=2))
    waiting, _ = history.store(stored(network, later), advance=False)

    assert history.advance_to(waiting) == waiting == history.main_tip()


def test_a_malformed_rollout_trailer_is_a_history_error() -> None:
    message = (
        "Accept snapshot 7 (sha256:abababababab…)\n\nConfig-Digest: sha256:" + "ab" * 32 + "\n"
        "Serial: 7\nNetwork: testnet\nRoot-Version: 1\nSigned-By: k1\nReason: fetch\n"
        "Rollout-Wave: 3\nRollout-Wave-At: 2025-12-02T10:00:00Z\nRollout-Position: 37.2\n"
    )
    with pytest.raises(HistoryError, match="lacks the reconciler trailers"):
        commit_info(message, oid="c" * 40, time=5)


# ---- through the command ----------------------------------------------------------------


def test_verify_passes_on_fetched_history_and_catches_a_commit_edited_with_git(
    node: NodeUnderTest, simulator: RepositorySimulator
) -> None:
    release = simulator.publish()
    node.fetch().ok()
    assert node.run("verify").ok().stdout == "checked 1 commit(s), 0 receipt(s): all good\n"

    (node.repo / "snapshot.json").write_bytes(release.snapshot_payload.replace(b"16", b"99"))
    message = node.git("log", "-1", "--format=%B")
    node.git("commit", "-q", "-a", "-m", message)
    edited = node.git("rev-parse", "HEAD").strip()

    outcome = node.run("verify")

    assert outcome.exit_code == 1
    assert outcome.stdout.splitlines() == [
        f"BAD  commit {edited[:12]}: rejected commit {release.digest}: "
        "snapshot.json differs from the envelope's payload",
        "checked 2 commit(s), 0 receipt(s): 1 problem(s)",
    ]
