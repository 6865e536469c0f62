"""What must hold on a node after it says it converged, whatever happened before.

``converged_problems`` checks a node against its HEAD and returns every violation it finds
as one line (an empty list means all is well):

* the managed containers are exactly HEAD's runtimes, each running with HEAD's spec label,
  and no temporary ``-NEXT`` container is left;
* the model trees are exactly HEAD's models, each file hashing to its digest, and every blob
  hashing to its name;
* no temporary file is left: no ``*.tmp``, no partial download, no tree being built, no git
  lock file, nothing in the work folder but the last plan;
* ``git fsck`` finds the repository sound (dangling objects are allowed: a commit interrupted
  before its ref moved leaves one, which is garbage, not damage);
* the record agrees (converged on HEAD's digest, no apply in progress) and ``reconcile
  verify`` passes; the newest receipt that says converged on HEAD's digest lists the very
  containers that run now.

``Fingerprint`` proves that nothing outside the state folder changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reconciler.apply.target import load_target
from reconciler.cli import cli
from reconciler.config.settings import load_settings
from reconciler.core.envelope import parse_envelope
from reconciler.history.node import Node
from reconciler.runtime.podman import PodmanEdge

__all__ = ["Fingerprint", "converged_problems", "receipts", "sha256_file", "temporary_files"]

_ALLOWED_WORK = {"plan.json"}  # the last plan, kept for the hooks and operators
_LOCK_FILES = {"watch.lock"}  # flock files, held open, never temporary


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def open_node(env: dict[str, str]) -> Node:
    settings = load_settings(config=env["RECONCILER_CONFIG"], environ=env)
    return Node(settings)


def receipts(node: Node) -> list[tuple[str, dict[str, Any]]]:
    """(commit, receipt payload) for every receipt line, in note order per commit."""
    found = []
    for oid in node.history.noted_commits():
        for line in node.history.notes(oid):
            envelope = parse_envelope(line.encode("utf-8"))
            found.append((oid, json.loads(envelope.payload)))
    return found


def _is_temporary(rel: Path) -> bool:
    name = rel.name
    if name.endswith((".tmp", ".lock")) and name not in _LOCK_FILES:
        return True  # write_atomic scratch files, git's ref and index locks
    if name.startswith("tmp_") or "tmp_obj" in name:
        return True  # libgit2's scratch objects
    return rel.parts[0] == "work" and rel.parts[1:] not in {(n,) for n in _ALLOWED_WORK}


def temporary_files(state_dir: Path) -> list[str]:
    """Leftovers of an interrupted write anywhere in the state folder."""
    found = []
    for folder, _dirs, files in os.walk(state_dir):
        rel_folder = Path(folder).relative_to(state_dir)
        for name in files:
            rel = rel_folder / name
            if _is_temporary(rel):
                found.append(str(rel))
    return sorted(found)


def _git_fsck(repo: Path) -> list[str]:
    done = subprocess.run(
        ["git", "-C", str(repo), "fsck", "--full", "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull},
        timeout=60,
        check=False,
    )
    bad = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and not line.startswith(("dangling ", "Checking", "notice:"))
    ]
    if done.returncode != 0 or bad:
        return [f"git fsck (exit {done.returncode}): {'; '.join(bad)[:300]}"]
    return []


def _verify_command(env: dict[str, str]) -> list[str]:
    # standalone_mode=False: a Ctrl-C reaches the campaign instead of becoming "Aborted!".
    result = CliRunner().invoke(
        cli, ["verify"], env=env, catch_exceptions=False, standalone_mode=False
    )
    if result.exit_code != 0:
        return [f"reconcile verify exit {result.exit_code}: {result.output.strip()[:300]}"]
    return []


def _containers(node: Node, desired: Any) -> tuple[list[str], dict[str, str]]:
    problems = []
    with PodmanEdge(node.settings.effective_podman_url) as edge:
        observed = edge.observe()
    wanted = {spec.name: spec for spec in desired.containers}
    running: dict[str, str] = {}
    for container in observed:
        if not container.managed:
            continue
        spec = wanted.get(container.name)
        if spec is None:
            problems.append(f"container {container.name} ({container.state}) is not in HEAD")
            continue
        if container.spec_hash != spec.spec_hash:
            problems.append(f"container {container.name} carries another spec")
        if not container.running:
            problems.append(f"container {container.name} is {container.state}")
        running[container.name] = container.id
    for name in sorted(set(wanted) - set(running)):
        problems.append(f"container {name} of HEAD is missing")
    return problems, running


def _models(node: Node, desired: Any) -> list[str]:
    problems = []
    models_dir = node.paths.models
    wanted = {f"{m.name}/{m.version}": m for m in desired.snapshot.models}
    trees = {
        f"{name.name}/{version.name}"
        for name in (models_dir.iterdir() if models_dir.is_dir() else [])
        if name.is_dir() and name.name != "blobs"
        for version in name.iterdir()
    }
    for extra in sorted(trees - set(wanted)):
        problems.append(f"model tree {extra} is not in HEAD")
    for tree, model in sorted(wanted.items()):
        root = models_dir / tree
        files = {
            str(Path(folder, f).relative_to(root))
            for folder, _d, names in os.walk(root)
            for f in names
        }
        expected = {f.path for f in model.files}
        if files != expected:
            problems.append(f"model {tree} holds {sorted(files)}, HEAD says {sorted(expected)}")
        for file in model.files:
            path = root / file.path
            if path.is_file() and "sha256:" + sha256_file(path) != file.digest:
                problems.append(f"model file {tree}/{file.path} does not match its digest")
    blobs = models_dir / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if sha256_file(blob) != blob.name:
            problems.append(f"blob {blob.name[:16]}… does not hash to its name")
    return problems


def _record_and_receipts(node: Node, desired: Any, running: dict[str, str]) -> list[str]:
    problems = []
    state = node.state
    if not state.converged or state.applied_digest != desired.digest:
        problems.append(
            f"record says converged={state.converged} on {state.applied_digest}, "
            f"HEAD is {desired.digest}"
        )
    if state.apply_in_progress:
        problems.append("record still shows an apply in progress")
    mine = [r for _oid, r in receipts(node) if r.get("config_digest") == desired.digest]
    done = [r for r in mine if r.get("result") == "converged"]
    if not done:
        problems.append(f"no receipt says HEAD {desired.digest[:19]}… converged")
        return problems
    if "containers" not in done[-1]:
        return problems  # written by the next pass for an attempt killed before its receipt
    listed = {c["name"]: c["id"] for c in done[-1]["containers"]}
    listed = {name: cid for name, cid in listed.items() if not name.endswith("-NEXT")}
    if listed != running:
        problems.append(f"the converged receipt lists {listed}, running are {running}")
    return problems


def converged_problems(env: dict[str, str]) -> list[str]:
    """Every way in which the node of ``env`` (settings file, state folder) is not converged
    on its HEAD, one line each."""
    node = open_node(env)
    head = node.history.head_oid()
    if head is None:
        return ["no HEAD"]
    desired = load_target(node, head)
    container_problems, running = _containers(node, desired)
    problems = container_problems + _models(node, desired)
    problems += [f"temporary file left: {t}" for t in temporary_files(node.paths.state_dir)]
    problems += _git_fsck(node.paths.repo)
    problems += _record_and_receipts(node, desired, running)
    problems += _verify_command(env)
    return problems


@dataclass(frozen=True)
class Fingerprint:
    """Every file under some folders (minus excluded subfolders): size and content hash."""

    files: dict[str, tuple[int, str]]

    @classmethod
    def of(cls, *folders: Path, exclude: tuple[Path, ...] = ()) -> Fingerprint:
        files: dict[str, tuple[int, str]] = {}
        skip = [e.resolve() for e in exclude]
        for folder in folders:
            for current, dirs, names in os.walk(folder):
                here = Path(current).resolve()
                dirs[:] = [d for d in dirs if (here / d) not in skip]
                for name in names:
                    path = here / name
                    files[str(path)] = (path.stat().st_size, sha256_file(path))
        return cls(files)

    def changes(self, later: Fingerprint) -> list[str]:
        changed = [p for p in self.files if later.files.get(p) != self.files[p]]
        added = [p for p in later.files if p not in self.files]
        return [f"changed outside the state folder: {p}" for p in sorted(changed + added)]
