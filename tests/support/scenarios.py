"""Scenario helpers shared by the Podman-backed test modules.

Used by ``test_apply``, ``test_watch``, ``test_receipts`` and ``test_crash``: build and
serve snapshot bodies (``served_model``, ``runtime``, ``snapshot_body``), give a node under
test the private Podman service and a hooks folder (``node_env``, ``write_hook``), run a pass
(``once``, ``converged``) and read what it left (``containers``, ``running``, ``receipts``,
``head``); ``forge_commit`` makes a commit the agent never verified, with stock git.
``AGENT_COMMAND`` runs the real ``reconcile`` command as a process of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import sys
from pathlib import Path
from typing import Any

from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest, Outcome, stock_git
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import base_snapshot

# One-try health checks: the gate answers at once instead of waiting the edge's settle time.
HEALTHY = {"command": ["true"], "retries": 1, "interval_s": 1, "timeout_s": 5}
UNHEALTHY = {"command": ["false"], "retries": 1, "interval_s": 1, "timeout_s": 5}

# ``reconcile`` as a separate process (``python -c``), for tests that signal or kill it.
AGENT_COMMAND = (sys.executable, "-c", "from reconciler.cli import main; main()")


def served_model(
    server: FileServer, name: str, version: str, files: dict[str, bytes]
) -> dict[str, Any]:
    """A model entry whose files the ``server`` serves."""
    entries = []
    for path, data in files.items():
        server.write(f"models/{name}/{version}/{path}", data)
        entries.append(
            {
                "path": path,
                "size": len(data),
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "urls": [f"models/{name}/{version}/{path}"],
            }
        )
    return {"name": name, "version": version, "files": entries}


def runtime(name: str, image: str, **more: Any) -> dict[str, Any]:
    """A runtime entry with the one-try ``HEALTHY`` check; ``more`` adds or overrides fields."""
    return {"name": name, "image": image, "health": HEALTHY, **more}


def snapshot_body(
    *,
    models: list[dict[str, Any]] | None = None,
    runtimes: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """``base_snapshot()`` with these models and runtimes (none by default) and ``fields``."""
    body = base_snapshot()
    body["models"] = models or []
    body["runtimes"] = runtimes or []
    body.update(fields)
    return body


def node_env(podman: PodmanService, hooks: Path, **more: str) -> dict[str, str]:
    """What a node under test needs to reach the private Podman service."""
    hooks.mkdir(parents=True, exist_ok=True)
    return {
        "RECONCILER_PODMAN_URL": podman.url,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(hooks),
        "RECONCILER_HOOK_TIMEOUT_S": "20",
        **more,
    }


def write_hook(hooks: Path, name: str, body: str) -> Path:
    """An executable bash hook ``name`` in ``hooks``."""
    hooks.mkdir(parents=True, exist_ok=True)
    path = hooks / name
    path.write_text("#!/usr/bin/env bash\nset -u\n" + body + "\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def containers(podman: PodmanService) -> list[dict[str, Any]]:
    """Every container of the service: name, id, state, labels."""
    rows = json.loads(podman.cli("ps", "--all", "--format", "json").stdout or "[]")
    return [
        {
            "name": row["Names"][0],
            "id": row["Id"],
            "state": row["State"],
            "labels": row.get("Labels") or {},
        }
        for row in rows
    ]


def running(podman: PodmanService) -> dict[str, str]:
    """Running container name → the config digest it was made for."""
    return {
        c["name"]: c["labels"].get("io.resultity.reconciler.config-digest", "")
        for c in containers(podman)
        if c["state"] == "running"
    }


def receipt_lines(node: NodeUnderTest, commit: str) -> list[str]:
    """The receipt lines (DSSE envelopes) in ``refs/notes/applied`` on ``commit``."""
    text = node.git("notes", "--ref=applied", "show", commit)
    return [line for line in text.splitlines() if line.strip()]


def receipts(node: NodeUnderTest, commit: str) -> list[dict[str, Any]]:
    """The decoded payloads of the receipt lines on ``commit`` (signatures not checked)."""
    lines = receipt_lines(node, commit)
    return [json.loads(base64.b64decode(json.loads(line)["payload"])) for line in lines]


def all_receipts(node: NodeUnderTest) -> list[dict[str, Any]]:
    """Every receipt in the state repository, oldest attempt first."""
    listing = node.git("notes", "--ref=applied", "list").split()
    commits = listing[1::2]
    found = [r for commit in commits for r in receipts(node, commit)]
    return sorted(found, key=lambda r: (r["started_at"], r["finished_at"]))


def head(node: NodeUnderTest) -> dict[str, str]:
    """HEAD's commit and trailers, read with stock git."""
    oid = node.git("rev-parse", "HEAD").strip()
    message = node.git("log", "-1", "--format=%B", oid)
    trailers = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and " " not in key:
            trailers[key] = value
    return {"commit": oid, **trailers}


def once(node: NodeUnderTest, env: dict[str, str], *args: str) -> Outcome:
    """``reconcile once ARGS`` on ``node`` with ``env``."""
    return node.run("once", *args, env=env)


def converged(outcome: Outcome) -> Outcome:
    """``outcome``, once it is checked to have exited 0."""
    assert outcome.exit_code == 0, f"exit {outcome.exit_code}: {outcome.stdout}{outcome.stderr}"
    return outcome


def forge_commit(node: NodeUnderTest, *, like: str, envelope: bytes) -> str:
    """A commit made with stock git plumbing: ``like``'s snapshot.json, trailers and parent,
    with another envelope.json."""
    tree_listing = node.git("ls-tree", like)
    snapshot_blob = next(
        line.split()[2] for line in tree_listing.splitlines() if line.endswith("snapshot.json")
    )
    envelope_file = node.home / "forged-envelope.json"
    envelope_file.write_bytes(envelope)
    envelope_blob = node.git("hash-object", "-w", str(envelope_file)).strip()
    tree = _git_input(
        node,
        ["mktree"],
        f"100644 blob {envelope_blob}\tenvelope.json\n100644 blob {snapshot_blob}\tsnapshot.json\n",
    )
    message = node.git("log", "-1", "--format=%B", like)
    return _git_input(node, ["commit-tree", tree, "-p", like], message)


def _git_input(node: NodeUnderTest, args: list[str], text: str) -> str:
    return stock_git(node.repo, *args, stdin=text.encode()).decode().strip()
