"""Fixtures for intake scenarios: a simulated network behind a real server, and a real node.

* ``simulator``: a ``RepositorySimulator`` whose origin folder is the ``file_server``'s root,
  so what it publishes is served over real HTTP on 127.0.0.1.
* ``node``: a ``NodeUnderTest`` initialised (``reconcile init``) against that server with the
  simulator's root 1. It runs the real ``reconcile`` command in-process through click's
  runner, with ``RECONCILER_CONFIG`` and ``RECONCILER_STATE_DIR`` in the test's tmp_path.
* ``make_node``: the same for another origin URL (``file://`` nodes) or another root.

``NodeUnderTest.snapshot()`` captures what a rejected fetch must leave alone: every git ref
(HEAD included, symbolic or detached) and the trusted roots on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2
import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from tests.support.fileserver import FileServer
from tests.support.signing import RepositorySimulator

__all__ = [
    "NodeUnderTest",
    "Outcome",
    "StateView",
    "make_node",
    "node",
    "repository_refs",
    "simulator",
    "stock_git",
]

# Short enough that a test which goes wrong cannot hang the suite; tests of the deadline
# itself set it lower still.
DEFAULT_FETCH_TIMEOUT_S = "5"


@dataclass(frozen=True)
class Outcome:
    """What one ``reconcile`` invocation did."""

    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_line(self) -> str:
        """The one line the CLI prints for a failure, without its ``reconcile: `` prefix."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"expected exactly one line on stderr, got {self.stderr!r}"
        assert lines[0].startswith("reconcile: "), lines[0]
        return lines[0].removeprefix("reconcile: ")

    def ok(self) -> Outcome:
        assert self.exit_code == 0, f"exit {self.exit_code}: {self.stderr or self.stdout}"
        return self


@dataclass(frozen=True)
class StateView:
    """What must not change when a document is rejected."""

    refs: dict[str, str]
    roots: dict[str, bytes]


def repository_refs(repo_path: Path) -> dict[str, str]:
    """Every ref of the repository and its target; ``HEAD`` as ``-> <ref>`` plus its commit."""
    repo = pygit2.Repository(str(repo_path))
    refs: dict[str, str] = {}
    for name in repo.references:
        ref = repo.references[name]
        refs[name] = str(ref.target)
    head = repo.lookup_reference("HEAD")
    if head.type == pygit2.enums.ReferenceType.SYMBOLIC:
        refs["HEAD"] = f"-> {head.target}"
    else:
        refs["HEAD"] = str(head.target)
    if not repo.head_is_unborn:
        refs["HEAD^{commit}"] = str(repo.head.target)
    return refs


class NodeUnderTest:
    """A node's settings and state folder in ``home``, driven through the real CLI."""

    def __init__(self, home: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.config = home / "config.toml"
        self.state_dir = home / "state"
        self.env: dict[str, str] = {
            "RECONCILER_CONFIG": str(self.config),
            "RECONCILER_STATE_DIR": str(self.state_dir),
            "RECONCILER_FETCH_TIMEOUT_S": DEFAULT_FETCH_TIMEOUT_S,
            **(env or {}),
        }

    @property
    def repo(self) -> Path:
        return self.state_dir / "snapshots"

    def run(self, *args: str, env: Mapping[str, str | None] | None = None) -> Outcome:
        """``reconcile ARGS`` in-process; ``env`` adds variables (``None`` removes one)."""
        runner = CliRunner()
        started = time.monotonic()
        result = runner.invoke(
            cli, list(args), env={**self.env, **(env or {})}, catch_exceptions=False
        )
        return Outcome(
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            seconds=time.monotonic() - started,
        )

    def init(self, origin: str, root: bytes) -> Outcome:
        root_file = self.home / "root.json"
        root_file.write_bytes(root)
        return self.run("init", "--origin", origin, "--root", str(root_file))

    def fetch(self, **env: str) -> Outcome:
        return self.run("fetch", env=env)

    def status(self) -> dict[str, Any]:
        outcome = self.run("status", "--json").ok()
        report = json.loads(outcome.stdout)
        assert isinstance(report, dict)
        return report

    def status_text(self) -> str:
        return self.run("status").ok().stdout

    def refs(self) -> dict[str, str]:
        return repository_refs(self.repo)

    def roots(self) -> dict[str, bytes]:
        folder = self.state_dir / "roots"
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}

    def snapshot(self) -> StateView:
        return StateView(refs=self.refs(), roots=self.roots())

    def record(self) -> dict[str, Any]:
        """The raw node record (node-state.json)."""
        data = json.loads((self.state_dir / "node-state.json").read_bytes())
        assert isinstance(data, dict)
        return data

    def git(self, *args: str) -> str:
        """Stock git in the state repository, as an operator would run it."""
        return stock_git(self.repo, *args).decode("utf-8")


def stock_git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run the stock ``git`` binary in ``repo`` with no user or system configuration."""
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "operator",
        "GIT_AUTHOR_EMAIL": "operator@example.invalid",
        "GIT_COMMITTER_NAME": "operator",
        "GIT_COMMITTER_EMAIL": "operator@example.invalid",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr.decode()}")
    return done.stdout


@pytest.fixture
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting may leak in from the developer's shell."""
    for name in list(os.environ):
        if name.startswith(("RECONCILER_", "RECONCILE_")) or name == "CONTAINER_HOST":
            monkeypatch.delenv(name)


@pytest.fixture
def simulator(file_server: FileServer) -> RepositorySimulator:
    return RepositorySimulator(folder=file_server.root)


@pytest.fixture
def make_node(tmp_path: Path, _clean_environment: None) -> Callable[..., NodeUnderTest]:
    """``make_node(origin, root_envelope, name=..., **env)``: an initialised node."""

    def make(origin: str, root: bytes, *, name: str = "node", **env: str) -> NodeUnderTest:
        home = tmp_path / name
        home.mkdir()
        node = NodeUnderTest(home, env=env)
        node.init(origin, root).ok()
        return node

    return make


@pytest.fixture
def node(
    make_node: Callable[..., NodeUnderTest],
    file_server: FileServer,
    simulator: RepositorySimulator,
) -> NodeUnderTest:
    return make_node(file_server.url, simulator.roots[1])
