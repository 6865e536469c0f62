"""Signed apply receipts (docs/contract.md §4): one DSSE line per attempt in ``refs/notes/applied``.

The signatures are checked here with PyNaCl and the tests' own PAE (``tests.support.signing``),
independently of ``reconciler.envelope``; tampering is done with stock ``git notes``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import VerifyKey

from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, stock_git
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import (
    converged,
    head,
    node_env,
    once,
    receipt_lines,
    receipts,
    runtime,
    served_model,
    snapshot_body,
    write_hook,
)
from tests.support.signing import RepositorySimulator, pae

pytestmark = pytest.mark.podman

RECEIPT_TYPE = "application/vnd.resultity.receipt+json"


def _check_signature(node: NodeUnderTest, line: str) -> dict[str, Any]:
    envelope = json.loads(line)
    public = bytes.fromhex((node.state_dir / "node.pub").read_text().strip())
    payload = base64.b64decode(envelope["payload"])
    [signature] = envelope["signatures"]
    assert envelope["payloadType"] == RECEIPT_TYPE
    assert signature["keyid"] == hashlib.sha256(public).hexdigest()
    VerifyKey(public).verify(pae(RECEIPT_TYPE, payload), base64.b64decode(signature["sig"]))
    body = json.loads(payload)
    assert isinstance(body, dict)
    return body


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    return tmp_path / "hooks"


@pytest.fixture
def env(podman_clean: PodmanService, hooks: Path) -> dict[str, str]:
    return node_env(podman_clean, hooks)


@pytest.fixture
def applied_twice(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    test_images: dict[str, str],
    hooks: Path,
    env: dict[str, str],
) -> str:
    """Snapshot 1 vetoed once, then applied; returns its commit."""
    write_hook(hooks, "pre-apply", 'echo "not now"; exit 1')
    write_hook(hooks, "post-apply", 'echo "post-apply saw $RECONCILE_RESULT"')
    model = served_model(file_server, "tiny", "v1", {"w.bin": b"w" * 100, "c.json": b"{}"})
    web = runtime("web", test_images["web"], models=["tiny:v1"])
    simulator.publish(body=snapshot_body(models=[model], runtimes=[web]))
    assert once(node, env).exit_code == 1
    (hooks / "pre-apply").unlink()
    converged(once(node, env))
    return head(node)["commit"]


def test_each_apply_attempt_leaves_one_receipt_signed_by_the_node_key(
    node: NodeUnderTest,
    applied_twice: str,
    podman_clean: PodmanService,
    test_images: dict[str, str],
) -> None:
    lines = receipt_lines(node, applied_twice)
    vetoed, applied = (_check_signature(node, line) for line in lines)

    assert len(lines) == 2
    assert vetoed["result"] == "vetoed"
    assert vetoed["actions"] == []
    assert [(h["name"], h["exit_code"], h["output"]) for h in vetoed["hooks"]] == [
        ("pre-apply", 1, "not now\n"),
        ("post-apply", 0, "post-apply saw vetoed\n"),
    ]
    assert applied["result"] == "converged"
    assert applied["error"] is None
    assert applied["commit"] == applied_twice
    assert applied["config_digest"] == head(node)["Config-Digest"]
    assert applied["started_at"] <= applied["finished_at"]
    assert applied["started_at"].endswith("Z")
    [ps] = json.loads(podman_clean.cli("ps", "--format", "json").stdout)
    kinds = [(a["action"]["kind"], a["ok"]) for a in applied["actions"]]
    assert kinds == [("pull", True), ("create", True)]
    assert applied["actions"][1]["container_id"] == ps["Id"]
    [container] = applied["containers"]
    assert container["id"] == ps["Id"]
    assert container["image"] == test_images["web"]  # the pinned reference, digest included
    assert container["image_id"] == ps["ImageID"]
    assert set(applied["models"]) == {"tiny:v1"}
    assert applied["models"]["tiny:v1"].startswith("sha256:")
    assert [(h["name"], h["ran"], h["exit_code"]) for h in applied["hooks"]] == [
        ("pre-apply", False, None),
        ("post-apply", True, 0),
    ]


def test_verify_passes_and_names_a_receipt_altered_with_stock_git(
    node: NodeUnderTest, applied_twice: str
) -> None:
    assert node.run("verify").ok().stdout.splitlines()[-1].endswith("all good")
    lines = receipt_lines(node, applied_twice)
    envelope = json.loads(lines[1])
    body = json.loads(base64.b64decode(envelope["payload"]))
    body["result"] = "failed"  # rewrite history: claim the apply failed
    envelope["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    lines[1] = json.dumps(envelope)
    edited = node.home / "note.txt"
    edited.write_text("\n".join(lines) + "\n")
    stock_git(node.repo, "notes", "--ref=applied", "add", "-f", "-F", str(edited), applied_twice)

    outcome = node.run("verify")

    assert outcome.exit_code == 1
    assert f"BAD  receipt 2 on {applied_twice[:12]}" in outcome.stdout
    assert f"receipt 1 on {applied_twice[:12]}" not in outcome.stdout


def test_receipts_show_in_git_log_and_reconcile_log(
    node: NodeUnderTest, applied_twice: str
) -> None:
    shown = node.git("log", "--notes=applied", "-1", applied_twice)
    assert "Notes (applied):" in shown
    assert shown.count(RECEIPT_TYPE) == 2

    brief = node.run("log").ok().stdout
    assert "applied: vetoed, converged" in brief
    detailed = node.run("log", "--receipts").ok().stdout
    assert "receipt 1: vetoed" in detailed
    assert "hooks: pre-apply 1, post-apply 0" in detailed
    assert "receipt 2: converged" in detailed
    assert "ok   create reconciler-web" in detailed


def test_a_rollback_leaves_receipts_on_both_commits(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    env: dict[str, str],
) -> None:
    simulator.publish(body=snapshot_body(runtimes=[runtime("web", test_images["web"])]))
    converged(once(node, env))
    broken = runtime("web", test_images["web2"], health={"command": ["false"], "retries": 1})
    bad = simulator.publish(body=snapshot_body(runtimes=[broken]))
    assert once(node, env).exit_code == 1

    [failed] = receipts(node, node.git("rev-parse", f"refs/snapshots/{bad.hex}").strip())
    assert failed["result"] == "rolled-back"
    assert "health check failed" in failed["error"]
    assert [(a["action"]["kind"], a["ok"]) for a in failed["actions"]][-1] == ("replace", False)
    [back] = receipts(node, head(node)["commit"])
    assert (back["result"], back["reason"]) == ("converged", "rollback")
    assert node.run("verify").ok()
