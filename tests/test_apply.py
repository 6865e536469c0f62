"""The apply transaction end to end: hooks, veto, automatic rollback, quarantine, hold, runtime.

Every test drives the real ``reconcile`` command against a served origin (``file_server`` +
``RepositorySimulator``), the private Podman service and registry, a real git state repository
and real bash hooks. Runtimes carry a one-try health check (``true``) so that the gate answers
at once instead of waiting the edge's settle time; a broken runtime fails that gate.

The helpers shared with ``test_receipts``, ``test_watch`` and ``test_crash`` are in
``tests/support/scenarios.py``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import (
    HEALTHY,
    UNHEALTHY,
    containers,
    converged,
    forge_commit,
    head,
    node_env,
    once,
    receipts,
    running,
    runtime,
    served_model,
    snapshot_body,
    write_hook,
)
from tests.support.signing import Release, RepositorySimulator, base_snapshot

pytestmark = pytest.mark.podman

# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    folder = tmp_path / "hooks"
    folder.mkdir()
    return folder


@pytest.fixture
def env(podman_clean: PodmanService, hooks: Path) -> dict[str, str]:
    return node_env(podman_clean, hooks)


Publish = Callable[..., Release]


@pytest.fixture
def publish(simulator: RepositorySimulator) -> Publish:
    """``publish(runtimes=[...], models=[...], **fields)``: sign and serve the next snapshot."""

    def go(**options: Any) -> Release:
        serial = options.pop("serial", None)
        return simulator.publish(serial, body=snapshot_body(**options))

    return go


# ---- 1. the order and the hook environment -------------------------------------------------

RECORDING_HOOK = """
out="$RECORD_DIR/$(basename "$0")-$RECONCILE_SERIAL"
mkdir -p "$out"
env | grep '^RECONCILE_' | sort > "$out/env"
podman --url "$RECONCILE_PODMAN_URL" ps --all --format json > "$out/ps.json"
cp "$RECONCILE_PLAN" "$out/plan.json"
ls "$RECONCILE_STATE_DIR/runtime" > "$out/runtime" 2>/dev/null || true
ls -R "$RECONCILE_STATE_DIR/models" > "$out/models" 2>/dev/null || true
"""


def _recorded_env(folder: Path) -> dict[str, str]:
    lines = (folder / "env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_pre_apply_runs_before_anything_changes_and_hooks_get_the_contract_env(
    node: NodeUnderTest,
    publish: Publish,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    record = tmp_path / "record"
    record.mkdir()
    write_hook(hooks, "pre-apply", RECORDING_HOOK)
    write_hook(hooks, "post-apply", RECORDING_HOOK)
    env = {**env, "RECORD_DIR": str(record)}
    model = served_model(file_server, "tiny", "v1", {"w.bin": b"w" * 100})
    first = publish(models=[model], runtimes=[runtime("web", test_images["web"])])

    converged(once(node, env))

    pre = record / "pre-apply-1"
    assert json.loads((pre / "ps.json").read_text() or "[]") == []
    assert (pre / "runtime").read_text() == ""
    assert "w.bin" not in (pre / "models").read_text()
    plan = json.loads((pre / "plan.json").read_text())
    assert plan["config_digest"] == first.digest
    assert plan["models"]["install"] == ["tiny:v1"]
    assert [a["kind"] for a in plan["containers"]["actions"]] == ["pull", "create"]
    seen = _recorded_env(pre)
    assert seen["RECONCILE_CONFIG_DIGEST"] == first.digest
    assert seen["RECONCILE_PREVIOUS_DIGEST"] == ""
    assert seen["RECONCILE_SERIAL"] == "1"
    assert seen["RECONCILE_REASON"] == "fetch"
    assert seen["RECONCILE_STATE_DIR"] == str(node.state_dir)
    assert Path(seen["RECONCILE_PLAN"]).is_absolute()
    assert "RECONCILE_RESULT" not in seen
    post = record / "post-apply-1"
    assert _recorded_env(post)["RECONCILE_RESULT"] == "converged"
    assert [c["Names"][0] for c in json.loads((post / "ps.json").read_text())] == ["reconciler-web"]
    assert "jobs.json" in (post / "runtime").read_text()

    # The second snapshot replaces the container: pre-apply still sees the first one.
    second = publish(models=[model], runtimes=[runtime("web", test_images["web2"])])
    converged(once(node, env))
    pre2 = record / "pre-apply-2"
    [old] = json.loads((pre2 / "ps.json").read_text())
    assert old["Labels"]["io.resultity.reconciler.config-digest"] == first.digest
    seen2 = _recorded_env(pre2)
    assert seen2["RECONCILE_PREVIOUS_DIGEST"] == first.digest
    assert seen2["RECONCILE_CONFIG_DIGEST"] == second.digest
    assert running(podman_clean) == {"reconciler-web": second.digest}


# ---- 2. veto -------------------------------------------------------------------------------


def _node_files(node: NodeUnderTest) -> dict[str, bytes]:
    """Every file of the runtime and model folders, for before/after comparisons."""
    found = {}
    for folder in (node.state_dir / "runtime", node.state_dir / "models"):
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if path.is_file():
                found[str(path.relative_to(node.state_dir))] = path.read_bytes()
    return found


def test_a_vetoing_pre_apply_changes_nothing_and_is_recorded(
    node: NodeUnderTest,
    publish: Publish,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
) -> None:
    model = served_model(file_server, "tiny", "v1", {"w.bin": b"1" * 10})
    first = publish(models=[model], runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    before = {c["id"] for c in containers(podman_clean)}
    files = _node_files(node)

    write_hook(hooks, "pre-apply", 'echo "maintenance window closed"; exit 3')
    model2 = served_model(file_server, "tiny", "v2", {"w.bin": b"2" * 10})
    second = publish(
        models=[model2],
        runtimes=[runtime("web", test_images["web2"])],
        jobs={"max_tokens": 1, "max_queue": 1, "timeout_s": 1},
    )
    vetoed = once(node, env)

    assert vetoed.exit_code == 1
    assert "vetoed" in vetoed.stdout
    assert {c["id"] for c in containers(podman_clean)} == before
    assert running(podman_clean) == {"reconciler-web": first.digest}
    assert _node_files(node) == files
    status = node.status()
    assert status["converged"] is False
    assert status["head"]["digest"] == second.digest
    assert status["applied"]["digest"] == first.digest
    assert status["last_error"]["message"] == (
        "pre-apply vetoed serial 2 (exit 3): maintenance window closed"
    )
    assert status["quarantined"] == []
    [receipt] = receipts(node, head(node)["commit"])
    assert receipt["result"] == "vetoed"
    assert receipt["actions"] == []
    [pre] = [h for h in receipt["hooks"] if h["name"] == "pre-apply"]
    assert pre["exit_code"] == 3
    assert "maintenance window closed" in pre["output"]

    # Not quarantined: once the hook allows it, the next pass applies the same snapshot.
    (hooks / "pre-apply").unlink()
    converged(once(node, env))
    assert running(podman_clean) == {"reconciler-web": second.digest}


def test_a_pre_apply_hook_past_its_timeout_is_killed_and_vetoes(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
) -> None:
    write_hook(hooks, "pre-apply", "sleep 30 & wait")
    publish(runtimes=[runtime("web", test_images["web"])])

    started = time.monotonic()
    outcome = once(node, {**env, "RECONCILER_HOOK_TIMEOUT_S": "1"})

    assert outcome.exit_code == 1
    assert time.monotonic() - started < 15
    assert containers(podman_clean) == []
    [receipt] = receipts(node, head(node)["commit"])
    assert receipt["result"] == "vetoed"
    [pre] = [h for h in receipt["hooks"] if h["name"] == "pre-apply"]
    assert pre["timed_out"] is True
    assert pre["exit_code"] is None
    assert "killed after 1 s" in pre["output"]
    assert receipt["error"] == "pre-apply vetoed serial 1 (timed out after 1 s): no output"
    assert node.status()["last_error"]["message"] == receipt["error"]


# ---- 3. automatic rollback and quarantine --------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"health": UNHEALTHY}, id="fails-health-check"),
        pytest.param({"command": ["sh", "-c", "exit 7"], "health": None}, id="exits-at-once"),
    ],
)
def test_a_snapshot_whose_runtime_fails_is_rolled_back_and_quarantined(
    broken: dict[str, Any],
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    good_id = containers(podman_clean)[0]["id"]
    spec = {k: v for k, v in {**runtime("web", test_images["web2"]), **broken}.items() if v}
    second = publish(runtimes=[spec])

    failed = once(node, env)

    assert failed.exit_code == 1, failed.stdout + failed.stderr
    assert "rolled back" in failed.stdout
    assert running(podman_clean) == {"reconciler-web": first.digest}
    assert [c["name"] for c in containers(podman_clean)] == ["reconciler-web"]
    assert containers(podman_clean)[0]["id"] != good_id  # made again from snapshot 1
    top = head(node)
    assert top["Reason"] == "rollback"
    assert top["Config-Digest"] == first.digest
    status = node.status()
    assert status["quarantined"] == [second.digest]
    assert status["converged"] is True
    assert status["hold"]["active"] is False
    assert node.record()["quarantined"] == [second.digest]
    assert "quarantined" in node.status_text()
    bad_commit = node.git("rev-parse", f"refs/snapshots/{second.hex}").strip()
    assert [r["result"] for r in receipts(node, bad_commit)] == ["rolled-back"]
    assert [r["result"] for r in receipts(node, top["commit"])] == ["converged"]

    # The next pass sees snapshot 2 again at the origin and leaves it alone.
    again = once(node, env)
    assert again.exit_code == 0, again.stdout + again.stderr
    assert head(node)["commit"] == top["commit"]
    assert [r["result"] for r in receipts(node, bad_commit)] == ["rolled-back"]
    assert running(podman_clean) == {"reconciler-web": first.digest}

    # A higher serial is applied.
    third = publish(runtimes=[runtime("web", test_images["web2"])])
    converged(once(node, env))
    assert head(node)["Config-Digest"] == third.digest
    assert head(node)["Reason"] == "fetch"
    assert running(podman_clean) == {"reconciler-web": third.digest}
    assert node.status()["quarantined"] == [second.digest]


def test_resume_lifts_the_quarantine_and_tries_the_snapshot_again(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    # Healthy only once the operator has put a file in place on the node.
    needs_file = {**HEALTHY, "command": ["test", "-e", "/run/reconciler/operator-ok"]}
    second = publish(runtimes=[runtime("web", test_images["web2"], health=needs_file)])
    assert once(node, env).exit_code == 1
    assert node.status()["quarantined"] == [second.digest]
    assert running(podman_clean) == {"reconciler-web": first.digest}

    (node.state_dir / "runtime" / "operator-ok").write_text("")
    resumed = node.run("resume", env=env).ok()

    assert "serial 2" in resumed.stdout
    assert node.status()["quarantined"] == []
    assert node.record()["quarantined"] == []
    top = head(node)
    assert (top["Reason"], top["Config-Digest"]) == ("resume", second.digest)
    assert running(podman_clean) == {"reconciler-web": second.digest}
    assert node.status()["converged"] is True


def _missing_digest(image: str) -> str:
    return image.rsplit("@", 1)[0] + "@sha256:" + "1" * 64


@pytest.mark.parametrize("failure", ["registry-digest-missing", "model-hash-mismatch", "disk-full"])
def test_failures_not_caused_by_the_snapshot_quarantine_nothing_and_are_retried(
    failure: str,
    node: NodeUnderTest,
    publish: Publish,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    model = served_model(file_server, "tiny", "v1", {"w.bin": b"w" * 64})
    image = test_images["web2"]
    if failure == "registry-digest-missing":
        image = _missing_digest(image)
    second = publish(models=[model], runtimes=[runtime("web", image)])
    bad_env = dict(env)
    if failure == "model-hash-mismatch":
        file_server.faults.set("/models/tiny/v1/w.bin", body=b"x" * 64)
    if failure == "disk-full":
        bad_env["RECONCILER_DISK_RESERVE_BYTES"] = str(1 << 52)

    for attempt in (1, 2):
        outcome = once(node, bad_env)
        assert outcome.exit_code == 1, outcome.stdout + outcome.stderr
        assert running(podman_clean) == {"reconciler-web": first.digest}
        top = head(node)
        assert (top["Reason"], top["Config-Digest"]) == ("fetch", second.digest)
        status = node.status()
        assert status["quarantined"] == []
        assert status["converged"] is False
        assert status["last_error"] is not None
        assert [r["result"] for r in receipts(node, top["commit"])] == ["failed"] * attempt
    if failure != "registry-digest-missing":
        assert not (node.state_dir / "models" / "tiny" / "v1" / "w.bin").exists()

    if failure == "registry-digest-missing":
        return  # only a new snapshot can fix a wrong pin
    file_server.faults.clear()
    converged(once(node, env))
    assert running(podman_clean) == {"reconciler-web": second.digest}


def test_podman_down_quarantines_nothing_and_the_next_pass_converges(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
) -> None:
    publish(runtimes=[runtime("web", test_images["web"])])
    down = {**env, "RECONCILER_PODMAN_URL": f"unix://{hooks}/no-podman.sock"}

    outcome = once(node, down)

    assert outcome.exit_code == 1
    assert "unreachable" in outcome.stdout
    status = node.status()
    assert status["quarantined"] == []
    assert "no-podman.sock" in status["last_error"]["message"]
    converged(once(node, env))
    assert list(running(podman_clean)) == ["reconciler-web"]


# ---- 4. manual rollback, hold, resume, HEAD moved with git ---------------------------------


def test_rollback_goes_to_the_previous_snapshot_holds_and_resume_advances(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    publish(runtimes=[runtime("web", test_images["web2"])])
    converged(once(node, env))

    rolled = node.run("rollback", env=env).ok()

    assert "on hold" in rolled.stdout
    top = head(node)
    assert (top["Reason"], top["Config-Digest"]) == ("rollback", first.digest)
    assert running(podman_clean) == {"reconciler-web": first.digest}
    assert node.record()["hold"] is True
    assert node.status()["hold"]["active"] is True

    # While held, a new snapshot is stored under its ref alone and waits.
    third = publish(runtimes=[runtime("web", test_images["web2"], env={"V": "3"})])
    node.run("fetch", env=env).ok()
    assert head(node)["commit"] == top["commit"]
    stored = node.git("rev-parse", f"refs/snapshots/{third.hex}").strip()
    assert node.git("log", "-1", "--format=%B", stored).count(f"Config-Digest: {third.digest}")
    status = node.status()
    assert status["waiting"] == [{"digest": third.digest, "serial": 3}]
    assert "waiting" in node.status_text()
    converged(once(node, env))
    assert head(node)["commit"] == top["commit"]
    assert running(podman_clean) == {"reconciler-web": first.digest}

    resumed = node.run("resume", env=env).ok()

    assert "serial 3" in resumed.stdout
    top = head(node)
    assert (top["Reason"], top["Config-Digest"]) == ("resume", third.digest)
    assert running(podman_clean) == {"reconciler-web": third.digest}
    status = node.status()
    assert status["hold"]["active"] is False
    assert status["waiting"] == []
    assert status["converged"] is True


def test_rollback_names_its_target_by_digest_prefix_serial_or_git_revision(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    releases = []
    for n in (1, 2, 3):
        releases.append(publish(runtimes=[runtime("web", test_images["web"], env={"N": str(n)})]))
        converged(once(node, env))
    first_commit = node.git("rev-parse", f"refs/snapshots/{releases[0].hex}").strip()

    for target, expected in (
        (releases[1].hex[:12], releases[1]),
        ("1", releases[0]),
        (releases[2].digest, releases[2]),
        (first_commit[:10], releases[0]),
        ("main~1", releases[2]),
    ):
        node.run("rollback", target, env=env).ok()
        top = head(node)
        assert (top["Reason"], top["Config-Digest"]) == ("rollback", expected.digest), target
        assert running(podman_clean) == {"reconciler-web": expected.digest}, target
    assert node.status()["hold"]["active"] is True


def test_rollback_to_an_unknown_revision_changes_nothing(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    before = head(node)

    outcome = node.run("rollback", "deadbeef99", env=env)

    assert outcome.exit_code == 1
    assert "no snapshot matches" in outcome.error_line
    assert head(node) == before
    assert node.record()["hold"] is False


@pytest.mark.parametrize("how", ["reset", "checkout"])
def test_head_moved_with_stock_git_is_reverified_applied_and_held(
    how: str,
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    publish(runtimes=[runtime("web", test_images["web2"])])
    converged(once(node, env))
    target = node.git("rev-parse", f"refs/snapshots/{first.hex}").strip()

    if how == "reset":
        node.git("reset", "--hard", target)
    else:
        node.git("checkout", "--quiet", target)
    converged(once(node, env))

    assert node.git("rev-parse", "HEAD").strip() == target
    assert running(podman_clean) == {"reconciler-web": first.digest}
    status = node.status()
    assert status["hold"]["active"] is True
    assert "moved with git" in status["hold"]["reason"]
    assert status["converged"] is True
    assert [r["result"] for r in receipts(node, target)][-1] == "converged"

    # Held: a newer snapshot waits.
    third = publish(runtimes=[runtime("web", test_images["web2"], env={"V": "3"})])
    converged(once(node, env))
    assert node.git("rev-parse", "HEAD").strip() == target
    assert node.status()["waiting"] == [{"digest": third.digest, "serial": 3}]

    node.run("resume", env=env).ok()
    assert head(node)["Reason"] == "resume"
    assert running(podman_clean) == {"reconciler-web": third.digest}
    assert node.git("symbolic-ref", "HEAD").strip() == "refs/heads/main"


def test_a_commit_with_a_tampered_envelope_is_never_applied(
    node: NodeUnderTest,
    publish: Publish,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    before = {c["id"] for c in containers(podman_clean)}
    good = node.git("rev-parse", "HEAD").strip()
    # The same payload with a runtime swapped in, signed by a key the root does not list.
    envelope = json.loads(first.snapshot)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["runtimes"] = [runtime("web", test_images["web2"])]
    forged_payload = json.dumps(payload).encode()
    forged = simulator.sign("application/vnd.resultity.snapshot+json", forged_payload, ["mallory"])
    for bad_envelope in (forged, first.snapshot.replace(b'"sig": "', b'"sig": "AAAA')):
        bad = forge_commit(node, like=good, envelope=bad_envelope)
        node.git("reset", "--hard", bad)

        outcome = once(node, env)

        assert outcome.exit_code == 1, outcome.stdout
        assert "fails verification" in outcome.stdout
        assert {c["id"] for c in containers(podman_clean)} == before
        assert running(podman_clean) == {"reconciler-web": first.digest}
        status = node.status()
        assert status["converged"] is False
        assert f"rejected HEAD commit {bad[:12]}" in status["last_error"]["message"]
        assert status["hold"]["active"] is True
        assert _has_no_notes(node, bad)
    node.git("reset", "--hard", good)
    converged(once(node, env))


def _has_no_notes(node: NodeUnderTest, commit: str) -> bool:
    listing = node.git("notes", "--ref=applied", "list").split()
    return commit not in listing[1::2]


def test_a_first_snapshot_that_fails_is_quarantined_and_not_tried_again(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    bad = publish(runtimes=[runtime("web", test_images["web"], health=UNHEALTHY)])

    assert once(node, env).exit_code == 1
    assert node.status()["quarantined"] == [bad.digest]
    assert containers(podman_clean) == []
    again = once(node, env)

    assert again.exit_code == 1
    assert "quarantined" in again.stdout
    assert [r["result"] for r in receipts(node, head(node)["commit"])] == ["failed"]
    good = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    assert running(podman_clean) == {"reconciler-web": good.digest}


# ---- 6. the runtime is told ----------------------------------------------------------------


def _exec(podman: PodmanService, container: str, *command: str) -> str:
    return podman.cli("exec", container, *command, check=False).stdout


def _inspect(podman: PodmanService, container: str) -> dict[str, Any]:
    [data] = json.loads(podman.cli("inspect", container).stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("notify", ["signal:HUP", "restart"])
def test_a_jobs_change_rewrites_jobs_json_and_notifies_without_replacing(
    notify: str,
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    sleeper = runtime("sleeper", test_images["sleeper"], notify=notify)
    publish(runtimes=[sleeper])
    converged(once(node, env))
    jobs_file = node.state_dir / "runtime" / "jobs.json"
    inode = jobs_file.stat().st_ino
    before = _inspect(podman_clean, "reconciler-sleeper")

    publish(runtimes=[sleeper], jobs={"max_tokens": 8192, "max_queue": 2, "timeout_s": 60})
    converged(once(node, env))

    assert json.loads(jobs_file.read_text())["max_tokens"] == 8192
    assert jobs_file.stat().st_ino != inode  # replaced by rename, never rewritten in place
    seen = json.loads(_exec(podman_clean, "reconciler-sleeper", "cat", "/run/reconciler/jobs.json"))
    assert seen["max_tokens"] == 8192
    after = _inspect(podman_clean, "reconciler-sleeper")
    assert after["Id"] == before["Id"]
    assert after["State"]["Status"] == "running"
    [receipt] = receipts(node, head(node)["commit"])
    [action] = receipt["actions"]
    assert action["action"]["kind"] == "notify"
    assert action["container_id"] == before["Id"]
    if notify == "signal:HUP":
        assert action["message"] == "sent SIGHUP"
        deadline = time.monotonic() + 5
        while not _exec(podman_clean, "reconciler-sleeper", "cat", "/tmp/hups").strip():
            assert time.monotonic() < deadline, "the runtime never saw SIGHUP"
            time.sleep(0.1)
        assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
        assert len(_exec(podman_clean, "reconciler-sleeper", "cat", "/tmp/hups").split()) == 1
    else:
        assert action["message"] == "restarted"
        assert after["State"]["StartedAt"] != before["State"]["StartedAt"]


def test_participation_follows_opt_outs_and_vram_and_the_receipt_says_who_joined_and_left(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    env: dict[str, str],
) -> None:
    env = {**env, "RECONCILER_OPT_OUT_SUBCLOUDS": "eu-opted", "RECONCILER_VRAM_MIB": "16000"}
    subclouds = [
        {"id": "eu-small", "enabled": True},
        {"id": "eu-off", "enabled": False},
        {"id": "eu-opted", "enabled": True},
        {"id": "eu-huge", "enabled": True, "min_vram_mib": 80000},
        {"id": "eu-mid", "enabled": True, "min_vram_mib": 8000},
    ]
    publish(participation={"modes": ["testnet", "mainnet"], "subclouds": subclouds})
    converged(once(node, env))

    part = json.loads((node.state_dir / "runtime" / "participation.json").read_text())
    assert part["modes"] == ["testnet"]
    assert part["subclouds"] == ["eu-small", "eu-mid"]
    excluded = {e["id"] for e in part["excluded"]}
    assert excluded == {"eu-opted", "eu-huge"}
    [first] = receipts(node, head(node)["commit"])
    assert first["participation"]["joined"] == ["eu-small", "eu-mid"]

    changed = [*subclouds[1:], {"id": "us-new", "enabled": True}]
    publish(participation={"modes": ["testnet"], "subclouds": changed})
    converged(once(node, env))

    [second] = receipts(node, head(node)["commit"])
    assert second["participation"]["joined"] == ["us-new"]
    assert second["participation"]["left"] == ["eu-small"]
    assert second["participation"]["subclouds"] == ["eu-mid", "us-new"]


def test_an_approved_agent_version_is_shown_and_the_agent_update_hook_runs_once(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    hooks: Path,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    calls = tmp_path / "agent-update.calls"
    write_hook(
        hooks,
        "agent-update",
        f'echo "$RECONCILE_AGENT_VERSION $RECONCILE_AGENT_RUNNING $RECONCILE_AGENT_DIGEST"'
        f' "$RECONCILE_AGENT_PYTHON" >> {calls}; echo installing',
    )
    digest = "sha256:" + "ab" * 32
    body = base_snapshot()
    updates = {**body["updates"], "agent": {"version": "9.9.9", "digest": digest}}
    publish(updates=updates)

    converged(once(node, env))
    converged(once(node, env))

    from reconciler import __version__

    [call] = calls.read_text().splitlines()
    version, running, approved_digest, python = call.split(" ")
    assert (version, running, approved_digest) == ("9.9.9", __version__, digest)
    # The agent's own interpreter (the one that has reconciler installed), for pip.
    probe = subprocess.run(
        [python, "-c", "import reconciler; print(reconciler.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == __version__
    status = node.status()
    assert status["agent"]["running"] == __version__
    assert status["agent"]["approved"] == "9.9.9"
    assert status["agent"]["update_available"] is True
    assert status["agent"]["update_hook"]["exit_code"] == 0
    assert "9.9.9 approved (agent-update exited 0" in node.status_text()
    assert node.record()["agent_update"]["version"] == "9.9.9"
    assert node.record()["agent_update"]["digest"] == digest
    [receipt] = receipts(node, head(node)["commit"])
    [hook] = [h for h in receipt["hooks"] if h["name"] == "agent-update"]
    assert hook["output"].strip() == "installing"


# ---- 8. offline and stale ------------------------------------------------------------------


def _closed_port_origin() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_with_the_origin_down_once_exits_5_but_keeps_head_converged_and_repairs_drift(
    node: NodeUnderTest,
    publish: Publish,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    release = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    podman_clean.cli("rm", "--force", "--time", "0", "reconciler-web")

    outcome = once(node, {**env, "RECONCILER_ORIGIN": _closed_port_origin()})

    assert outcome.exit_code == 5
    assert "origin unreachable" in outcome.stderr
    assert running(podman_clean) == {"reconciler-web": release.digest}
    status = node.status()
    assert status["converged"] is True
    assert status["last_error"]["kind"] == "unreachable"


def test_an_expired_head_with_nothing_newer_keeps_head_running_and_status_says_stale(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    # Expired a minute ago: still accepted within the 5 min clock-skew allowance.
    release = simulator.publish(
        body=snapshot_body(runtimes=[runtime("web", test_images["web"])]), head_expires_in=-60
    )
    converged(once(node, env))
    converged(once(node, env))

    status = node.status()
    assert status["stale"]["stale"] is True
    assert status["stale"]["since"] == status["last_accepted"]["head_expires"]
    assert f"stale       since {status['stale']['since']}" in node.status_text()
    assert status["converged"] is True
    assert running(podman_clean) == {"reconciler-web": release.digest}


def test_once_offline_contacts_no_origin_or_mirror_and_says_what_is_missing(
    node: NodeUnderTest,
    publish: Publish,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    first = publish(runtimes=[runtime("web", test_images["web"])])
    converged(once(node, env))
    model = served_model(file_server, "tiny", "v1", {"w.bin": b"w" * 10})
    publish(models=[model], runtimes=[runtime("web", test_images["web"])])
    node.run("fetch", env=env).ok()
    file_server.stats.reset()

    outcome = once(node, env, "--offline")

    assert outcome.exit_code == 1
    assert "offline" in outcome.stdout
    assert "w.bin" in outcome.stdout
    assert file_server.stats.total_requests() == 0
    assert running(podman_clean) == {"reconciler-web": first.digest}  # nothing changed…
    assert [r["result"] for r in receipts(node, head(node)["commit"])] == ["failed"]
    converged(once(node, env))  # …until the node is online again
    assert file_server.stats.requests("/models/tiny/v1/w.bin") == 1
