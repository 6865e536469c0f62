"""The attack corpus: one scenario per threat of docs/security.md that no other test covers.

Each test plays the attacker against a real node (the ``reconcile`` CLI, a loopback origin,
real git, and where a pass needs one, the private Podman service), then checks that the
node refused and that nothing it trusts changed. The last test keeps docs/security.md
honest: every test the document cites must exist.
"""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from tests.reliability.agent import AgentCommand
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, stock_git
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import RepositorySimulator, base_snapshot, sign_envelope

REPO_ROOT = Path(__file__).resolve().parents[2]
SECURITY_DOC = REPO_ROOT / "docs" / "security.md"
RECEIPT_TYPE = "application/vnd.resultity.receipt+json"
PINNED = "127.0.0.1:5000/rt/web@sha256:" + "a" * 64


def podman_env(podman: PodmanService, tmp_path: Path) -> dict[str, str]:
    return {
        "RECONCILER_PODMAN_URL": podman.url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(tmp_path / "hooks"),
    }


def with_runtime(**fields: Any) -> dict[str, Any]:
    body = base_snapshot()
    body["runtimes"] = [{"name": "llm", "image": PINNED, **fields}]
    return body


# ---- fast-forward, freeze, extraneous dependencies ----------------------------------------


def test_a_huge_serial_signed_by_a_revoked_key_cannot_raise_the_floor(
    node: NodeUnderTest, simulator: RepositorySimulator
) -> None:
    simulator.publish()
    node.fetch().ok()
    simulator.make_root(2, keys=["k2"], signers=["k1", "k2"])  # k1 retired (say, stolen)
    node.fetch().ok()
    before = node.snapshot()
    floor = node.record()["last_serial"]

    forged = simulator.release(2**53, signers=["k1"])
    simulator.serve(forged)
    outcome = node.fetch()

    assert outcome.exit_code == 4
    assert "threshold" in outcome.error_line
    assert node.snapshot() == before
    assert node.record()["last_serial"] == floor
    # The network's next real serial still gets through: the attacker moved nothing.
    simulator.publish(2, signers=["k2"])
    assert "new HEAD" in node.fetch().ok().stdout


def test_a_frozen_origin_is_refused_once_its_head_expires_and_status_says_stale(
    node: NodeUnderTest, simulator: RepositorySimulator, tmp_path: Path
) -> None:
    simulator.publish(head_expires_in=3600)
    node.fetch().ok()
    later = AgentCommand(env=node.env, cwd=tmp_path).with_wrapper("faketime", "-f", "+2h")

    frozen = later.run("fetch")

    assert frozen.exit_code == 4, frozen.describe()
    assert re.search(r"rejected head\.json: expired at", frozen.reconcile_lines[0])
    status = json.loads(later.run("status", "--json").stdout)
    assert status["stale"]["stale"] is True
    assert json.loads(node.run("status", "--json").stdout)["stale"]["stale"] is False


def test_a_runtime_cannot_mount_a_model_the_snapshot_does_not_list(
    node: NodeUnderTest, simulator: RepositorySimulator
) -> None:
    before = node.snapshot()
    simulator.publish(body=with_runtime(models=["ghost:v1"]))

    outcome = node.fetch()

    assert outcome.exit_code == 4
    assert "mounts unknown model ghost:v1" in outcome.error_line
    assert node.snapshot() == before


# ---- what a snapshot may ask of the host ----------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"privileged": True},
        {"volumes": ["/:/host"]},
        {"mounts": [{"type": "bind", "source": "/etc", "target": "/etc"}]},
        {"network_mode": "host"},
        {"pid": "host"},
        {"cap_add": ["SYS_ADMIN"]},
        {"user": "0:0"},
        {"devices": ["/dev/sda"]},
        {"model_mount": "relative/path"},
        {"image": "127.0.0.1:5000/rt/web:latest"},
        {"image": "127.0.0.1:5000/rt/web"},
    ],
    ids=[
        "privileged",
        "volumes",
        "bind-mount",
        "host-network",
        "host-pid",
        "capability",
        "root-user",
        "host-device-path",
        "relative-model-mount",
        "tag-only-image",
        "untagged-image",
    ],
)
def test_a_signed_snapshot_asking_for_host_power_is_rejected_at_intake(
    node: NodeUnderTest, simulator: RepositorySimulator, fields: dict[str, Any]
) -> None:
    before = node.snapshot()
    simulator.publish(body=with_runtime(**fields))

    outcome = node.fetch()

    assert outcome.exit_code == 4, outcome.stdout + outcome.stderr
    assert "does not match the snapshot schema" in outcome.error_line
    assert node.snapshot() == before


# ---- hooks ------------------------------------------------------------------------------------


@pytest.mark.podman
def test_snapshot_values_never_reach_a_hooks_environment(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    dump = tmp_path / "hook-env"
    hook = hooks / "pre-apply"
    # Veto, so no container is made: the environment is what this test is about.
    hook.write_text(f"#!/bin/sh\nenv -0 > {dump}\nexit 1\n")
    hook.chmod(0o755)
    planted = {
        "LD_PRELOAD": "/tmp/evil.so",
        "BASH_ENV": "/tmp/evil.sh",
        "RECONCILE_CONFIG_DIGEST": "sha256:" + "0" * 64,
        "RECONCILE_STATE_DIR": "/",
        "PATH": "/tmp/evil-bin",
    }
    body = with_runtime(env=planted)
    body["models"][0]["tasks"] = ["evil-task"]
    release = simulator.publish(body=body)

    outcome = node.run("once", env=podman_env(podman_clean, tmp_path))

    assert outcome.exit_code == 1, outcome.stdout + outcome.stderr  # vetoed
    assert dump.exists(), outcome.stdout + outcome.stderr
    seen = dict(
        entry.split("=", 1) for entry in dump.read_bytes().decode().split("\0") if "=" in entry
    )
    assert seen["RECONCILE_CONFIG_DIGEST"] == release.digest
    assert seen["RECONCILE_STATE_DIR"] == str(node.state_dir)
    assert seen["RECONCILE_SERIAL"] == str(release.serial)
    assert "LD_PRELOAD" not in seen and "BASH_ENV" not in seen
    assert seen.get("PATH") != planted["PATH"]
    assert not any("pwned" in value or "evil" in value for value in seen.values())
    plan = json.loads(Path(seen["RECONCILE_PLAN"]).read_text())
    assert plan["config_digest"] == release.digest
    assert Path(seen["RECONCILE_PLAN"]).is_relative_to(node.state_dir)


# ---- model trees ----------------------------------------------------------------------------


@pytest.mark.podman
def test_a_symlink_planted_in_a_model_tree_is_replaced_never_written_through(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    tmp_path: Path,
) -> None:
    file_server.write("models/tiny-llm/config.json", b"abc")
    simulator.publish()
    env = podman_env(podman_clean, tmp_path)
    node.run("once", env=env).ok()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    planted = node.state_dir / "models" / "tiny-llm" / "v1" / "config.json"
    planted.unlink()
    planted.symlink_to(victim)

    node.run("once", env=env).ok()

    assert victim.read_bytes() == b"precious"
    assert not planted.is_symlink()
    assert planted.read_bytes() == b"abc"


# ---- receipts ---------------------------------------------------------------------------------


@pytest.fixture
def applied(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    tmp_path: Path,
) -> list[str]:
    """A node that applied two snapshots: the commits, oldest first."""
    file_server.write("models/tiny-llm/config.json", b"abc")
    env = podman_env(podman_clean, tmp_path)
    commits = []
    for max_tokens in (1024, 2048):
        body = base_snapshot()
        body["jobs"]["max_tokens"] = max_tokens
        simulator.publish(body=body)
        node.run("once", env=env).ok()
        commits.append(node.git("rev-parse", "HEAD").strip())
    assert node.run("verify").ok()
    return commits


def _set_note(node: NodeUnderTest, commit: str, lines: list[str]) -> None:
    note = node.home / "note.txt"
    note.write_text("\n".join(lines) + "\n")
    stock_git(node.repo, "notes", "--ref=applied", "add", "-f", "-F", str(note), commit)


def _notes(node: NodeUnderTest, commit: str) -> list[str]:
    return node.git("notes", "--ref=applied", "show", commit).splitlines()


@pytest.mark.podman
def test_verify_refuses_a_receipt_forged_with_another_key(
    node: NodeUnderTest, applied: list[str]
) -> None:
    forger = SigningKey(b"\x07" * 32)
    body = json.loads(base64.b64decode(json.loads(_notes(node, applied[1])[0])["payload"]))
    body["result"] = "failed"
    forged = sign_envelope(RECEIPT_TYPE, json.dumps(body).encode(), [forger]).decode()
    _set_note(node, applied[1], [*_notes(node, applied[1]), forged])

    outcome = node.run("verify")

    assert outcome.exit_code == 1
    assert f"BAD  receipt 2 on {applied[1][:12]}: not signed by this node's key" in outcome.stdout


@pytest.mark.podman
def test_verify_refuses_a_genuine_receipt_moved_to_another_commit(
    node: NodeUnderTest, applied: list[str]
) -> None:
    genuine = _notes(node, applied[1])[0]
    _set_note(node, applied[0], [*_notes(node, applied[0]), genuine])

    outcome = node.run("verify")

    assert outcome.exit_code == 1
    assert f"receipt 2 on {applied[0][:12]}: names another snapshot" in outcome.stdout


# ---- the document itself ----------------------------------------------------------------------

_CITED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_security_document_cites_exists() -> None:
    text = SECURITY_DOC.read_text(encoding="utf-8")
    cited = _CITED.findall(text)
    assert len(cited) >= 30, "docs/security.md should cite a test for every row"
    missing = [
        f"{file}::{name}"
        for file, name in cited
        if not (REPO_ROOT / file).is_file() or name not in _test_names(REPO_ROOT / file)
    ]
    assert missing == []
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    untested = [row[:60] for row in rows[1:] if "::test_" not in row and "| threat" not in row]
    assert untested == [], "every threat row needs a test"
