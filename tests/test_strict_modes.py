"""Strict modes (issue 19): the root agent refuses files that someone else could have written.

A throwaway user and group, made with ``groupadd``/``useradd`` for the session and removed at
the end, own or may write the hooks folder, a hook, a parent folder, the settings file or a
root document. Each case drives the real ``reconcile`` command against a served origin, a
real git state repository, real bash hooks and the private Podman service, and checks that
the hook did not run (the marker it would write is absent), the exit code, the one line, and
that nothing changed (git refs, the node record, the runtime folder). The tests run as root,
as the agent does; ``tmp_path`` is a root-owned 0700 folder under the sticky ``/tmp``, so the
rest of the suite passes the same checks.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.errors import SettingsError, UntrustedPathError
from reconciler.disk.strict import check_trusted
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import head, node_env, once, receipts, snapshot_body, write_hook
from tests.support.signing import RepositorySimulator

# ---- the throwaway user and group -----------------------------------------------------------


@dataclass(frozen=True)
class Stranger:
    user: str
    uid: int
    group: str
    gid: int

    @property
    def described(self) -> str:
        return f"user {self.user} (uid {self.uid})"


@pytest.fixture(scope="session")
def stranger() -> Iterator[Stranger]:
    """A local unprivileged user and its group, unique to this run, removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd (the passwd package)")
    tag = uuid.uuid4().hex[:8]
    group, user = f"rcg-{tag}", f"rcu-{tag}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--gid", group, "--shell", "/bin/false", user],
            check=True,
            capture_output=True,
        )
        try:
            yield Stranger(user, pwd.getpwnam(user).pw_uid, group, grp.getgrnam(group).gr_gid)
        finally:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


# ---- a node with a snapshot fetched and a hook that leaves a marker --------------------------


@dataclass(frozen=True)
class Scene:
    node: NodeUnderTest
    env: dict[str, str]
    hooks: Path
    marker: Path


@pytest.fixture
def scene(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    podman_clean: PodmanService,
    tmp_path: Path,
) -> Scene:
    """``node`` has fetched serial 1 (nothing applied) and a ``pre-apply`` that would leave
    ``marker``; its hooks folder is ``<tmp>/etc/hooks`` (0755 root, like its parents)."""
    hooks = tmp_path / "etc" / "hooks"
    marker = tmp_path / "pre-apply-ran"
    env = node_env(podman_clean, hooks)
    write_hook(hooks, "pre-apply", f"touch {marker}")
    simulator.publish(1, body=snapshot_body())
    node.run("fetch", env=env).ok()
    return Scene(node=node, env=env, hooks=hooks, marker=marker)


def _unchanged(node: NodeUnderTest) -> dict[str, Any]:
    """What a refusal must leave alone: refs but the receipts' notes, the record, runtime/."""
    refs = {k: v for k, v in node.refs().items() if k != "refs/notes/applied"}
    record = node.record() if (node.state_dir / "node-state.json").exists() else {}
    runtime = node.state_dir / "runtime"
    return {
        "refs": refs,
        "applied": record.get("applied"),
        "last_serial": record.get("last_serial"),
        "runtime": sorted(p.name for p in runtime.iterdir()) if runtime.exists() else [],
    }


def _chown(path: Path, stranger: Stranger, *, user: bool = True, group: bool = False) -> None:
    os.chown(path, stranger.uid if user else -1, stranger.gid if group else -1)


# ---- hooks: refused, never run, a veto in the receipt and in status -------------------------


def _group_writable(scene: Scene, stranger: Stranger) -> str:
    _chown(scene.hooks, stranger, user=False, group=True)
    scene.hooks.chmod(0o775)
    return f"hooks folder {scene.hooks} is writable by group"


def _others_writable(scene: Scene, stranger: Stranger) -> str:
    scene.hooks.chmod(0o757)
    return f"hooks folder {scene.hooks} is writable by others"


def _hook_owned_by_stranger(scene: Scene, stranger: Stranger) -> str:
    _chown(scene.hooks / "pre-apply", stranger)
    return f"hook {scene.hooks}/pre-apply is owned by {stranger.described}"


def _world_writable_parent(scene: Scene, stranger: Stranger) -> str:
    scene.hooks.parent.chmod(0o777)  # no sticky bit: anyone may rename hooks/ away
    parent = scene.hooks.parent
    return f"hooks folder {scene.hooks}: folder {parent} is writable by group and others"


@pytest.mark.podman
@pytest.mark.parametrize(
    "make_unsafe",
    [_group_writable, _others_writable, _hook_owned_by_stranger, _world_writable_parent],
    ids=["folder-group-writable", "folder-others-writable", "hook-of-another-user", "parent-0777"],
)
def test_a_hook_someone_else_could_have_written_is_never_run_and_vetoes(
    scene: Scene, stranger: Stranger, make_unsafe: Any
) -> None:
    reason = make_unsafe(scene, stranger)
    before = _unchanged(scene.node)

    outcome = once(scene.node, scene.env, "--offline")

    assert outcome.exit_code == 1
    assert not scene.marker.exists()
    expected = f"pre-apply vetoed serial 1 (not run): {reason}"
    assert expected in outcome.stdout
    assert _unchanged(scene.node) == before
    status = scene.node.status()
    assert status["converged"] is False
    assert status["last_error"]["message"] == expected
    assert [(h["hook"], h["reason"]) for h in status["refused_hooks"]] == [("pre-apply", reason)]
    [receipt] = receipts(scene.node, head(scene.node)["commit"])
    assert (receipt["result"], receipt["actions"], receipt["error"]) == ("vetoed", [], expected)
    [pre] = [h for h in receipt["hooks"] if h["name"] == "pre-apply"]
    assert (pre["name"], pre["ran"], pre["refused"]) == ("pre-apply", False, reason)
    assert reason in scene.node.run("verify", env=scene.env).stdout  # named before the next apply


@pytest.mark.podman
def test_the_relaxed_group_lets_its_members_manage_hooks_but_never_others(
    scene: Scene, stranger: Stranger
) -> None:
    _chown(scene.hooks, stranger, user=False, group=True)
    scene.hooks.chmod(0o2775)  # the usual setgid folder of a team
    hook = scene.hooks / "pre-apply"
    _chown(hook, stranger, group=True)  # written by a member of the group
    hook.chmod(0o775)
    relaxed = {**scene.env, "RECONCILER_STRICT_MODES_GROUP": stranger.group}
    expected = f"hooks folder {scene.hooks} is writable by group"
    before = _unchanged(scene.node)

    refused = once(scene.node, scene.env, "--offline")  # without the setting: refused
    assert refused.exit_code == 1
    assert expected in refused.stdout
    assert not scene.marker.exists()
    assert _unchanged(scene.node) == before

    scene.hooks.chmod(0o2777)  # the group's trust never extends to everyone
    others = once(scene.node, relaxed, "--offline")
    assert others.exit_code == 1
    assert f"hooks folder {scene.hooks} is writable by others" in others.stdout
    assert not scene.marker.exists()
    assert _unchanged(scene.node) == before

    scene.hooks.chmod(0o2775)
    done = once(scene.node, relaxed, "--offline")
    assert done.exit_code == 0, done.stdout + done.stderr
    assert scene.marker.exists()
    assert scene.node.status()["converged"] is True


@pytest.mark.podman
def test_a_refused_post_apply_and_agent_update_leave_the_apply_converged_and_show_in_status(
    scene: Scene, simulator: RepositorySimulator, stranger: Stranger
) -> None:
    (scene.hooks / "pre-apply").unlink()  # the only hooks: the two that cannot veto
    ran = {name: scene.hooks.parent / f"{name}-ran" for name in ("post-apply", "agent-update")}
    for name, marker in ran.items():
        write_hook(scene.hooks, name, f"touch {marker}")
    agent = {"version": "9.9.9", "digest": "sha256:" + "ab" * 32}
    updates = {**snapshot_body()["updates"], "agent": agent}
    simulator.publish(2, body=snapshot_body(updates=updates))
    reason = _group_writable(scene, stranger)

    outcome = once(scene.node, scene.env)

    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr  # neither can veto
    assert not any(marker.exists() for marker in ran.values())
    status = scene.node.status()
    assert (status["converged"], status["applied"]["serial"]) == (True, 2)
    assert [(h["hook"], h["reason"]) for h in status["refused_hooks"]] == [
        ("post-apply", reason),
        ("agent-update", reason),
    ]
    assert scene.node.record()["agent_update"] is None  # not a run: it runs once fixed
    text = scene.node.status_text()
    assert f"refused     post-apply not run: {reason} (since " in text
    assert f"refused     agent-update not run: {reason} (since " in text
    [receipt] = receipts(scene.node, head(scene.node)["commit"])
    hooks = {h["name"]: (h["ran"], h.get("refused")) for h in receipt["hooks"]}
    assert hooks == {
        "pre-apply": (False, None),  # not installed: neither run nor refused
        "post-apply": (False, reason),
        "agent-update": (False, reason),
    }

    scene.hooks.chmod(0o755)
    once(scene.node, scene.env, "--offline").ok()  # nothing to apply: only agent-update asked
    assert ran["agent-update"].exists() and not ran["post-apply"].exists()
    assert [h["hook"] for h in scene.node.status()["refused_hooks"]] == ["post-apply"]

    simulator.publish(3, body=snapshot_body(updates=updates))
    once(scene.node, scene.env).ok()  # the next apply asks post-apply again: it runs
    assert ran["post-apply"].exists()
    assert scene.node.status()["refused_hooks"] == []
    assert "refused" not in scene.node.status_text()


@pytest.mark.podman
def test_a_metrics_folder_someone_else_could_write_is_not_written_and_shows_in_status(
    scene: Scene, stranger: Stranger, tmp_path: Path
) -> None:
    parent = tmp_path / "srv"
    folder = parent / "prom"
    folder.mkdir(parents=True)
    metrics = folder / "reconciler.prom"
    env = {**scene.env, "RECONCILER_METRICS_PATH": str(metrics)}
    _chown(parent, stranger)  # they could rename prom/ away and put a symlink in its place
    owned = f"metrics folder {folder}: folder {parent} is owned by {stranger.described}"

    outcome = once(scene.node, env, "--offline")

    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr  # the node did converge
    assert scene.marker.exists()
    assert sorted(folder.iterdir()) == []  # not even a temporary file
    assert f"metrics file {metrics} not written: {owned}" in outcome.stdout + outcome.stderr
    status = scene.node.status()
    assert status["metrics_refused"]["reason"] == owned
    assert f"refused     metrics file not written: {owned} (since " in scene.node.status_text()
    verify = scene.node.run("verify", env=env)
    assert verify.exit_code == 1
    assert f"BAD  metrics file {metrics}: {owned}" in verify.stdout.splitlines()

    _chown(parent, Stranger("root", 0, "root", 0))
    folder.chmod(0o777)  # writable by others: refused for its own sake, with a new reason
    once(scene.node, env, "--offline").ok()
    others = f"metrics folder {folder} is writable by group and others"
    assert scene.node.status()["metrics_refused"]["reason"] == others
    assert sorted(folder.iterdir()) == []

    folder.chmod(0o755)
    once(scene.node, env, "--offline").ok()
    assert "reconciler_" in metrics.read_text()
    assert scene.node.status()["metrics_refused"] is None
    assert scene.node.run("verify", env=env).ok().stdout.endswith("all good\n")


# ---- settings, roots, credentials, state: exit 2 and one line --------------------------------


@pytest.mark.podman
def test_a_settings_file_writable_by_others_is_exit_2_and_changes_nothing(
    scene: Scene, stranger: Stranger
) -> None:
    before = _unchanged(scene.node)
    scene.node.config.chmod(0o646)

    outcome = once(scene.node, scene.env)

    assert outcome.exit_code == 2
    assert outcome.error_line == f"settings file {scene.node.config} is writable by others"
    assert not scene.marker.exists()
    assert _unchanged(scene.node) == before
    status = scene.node.run("status")
    assert status.exit_code == 2  # status says it too, in the same line
    assert status.error_line == outcome.error_line


def test_a_root_document_owned_by_another_user_is_refused_at_init_and_once(
    node: NodeUnderTest, simulator: RepositorySimulator, stranger: Stranger, tmp_path: Path
) -> None:
    fresh = NodeUnderTest(tmp_path / "fresh")
    fresh.home.mkdir()
    root_file = fresh.home / "root.json"
    root_file.write_bytes(simulator.roots[1])
    _chown(root_file, stranger)

    init = fresh.run("init", "--origin", "http://127.0.0.1:9/", "--root", str(root_file))

    assert init.exit_code == 2
    assert init.error_line == f"root file {root_file} is owned by {stranger.described}"
    assert sorted(p.name for p in fresh.home.iterdir()) == ["root.json"]  # nothing written

    # The installed copy in the state folder is held to the same rule.
    simulator.publish(1, body=snapshot_body())
    before = _unchanged(node)
    installed = node.state_dir / "roots" / "1.json"
    _chown(installed, stranger)
    fetched = node.fetch()
    assert fetched.exit_code == 2
    assert fetched.error_line == f"trusted root {installed} is owned by {stranger.described}"
    assert _unchanged(node) == before


def test_state_files_and_registry_credentials_someone_else_could_write_are_exit_2(
    node: NodeUnderTest, simulator: RepositorySimulator, stranger: Stranger, tmp_path: Path
) -> None:
    simulator.publish(1, body=snapshot_body())
    node.fetch().ok()
    before = _unchanged(node)
    record = node.state_dir / "node-state.json"
    record.chmod(0o666)
    outcome = node.run("status")
    assert outcome.exit_code == 2
    assert outcome.error_line == f"node record {record} is writable by group and others"
    record.chmod(0o644)
    elsewhere = tmp_path / "record-elsewhere.json"  # a symlink is judged by its target
    os.link(record, elsewhere)
    record.unlink()
    record.symlink_to(elsewhere)
    elsewhere.chmod(0o646)
    outcome = node.run("status")
    assert outcome.exit_code == 2
    assert outcome.error_line == f"node record {record}: file {elsewhere} is writable by others"
    record.unlink()
    os.link(elsewhere, record)
    record.chmod(0o644)

    auth = tmp_path / "auth.json"
    auth.write_text('{"auths": {}}', encoding="utf-8")
    _chown(auth, stranger)
    outcome = node.run("status", env={"RECONCILER_REGISTRY_AUTH_FILE": str(auth)})
    assert outcome.exit_code == 2
    assert outcome.error_line == f"registry_auth_file {auth} is owned by {stranger.described}"
    assert _unchanged(node) == before


# ---- what the agent writes: init sets the modes, verify reports drift, init repairs it -------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_init_sets_the_modes_verify_reports_drift_and_init_again_repairs_it(
    node: NodeUnderTest, simulator: RepositorySimulator
) -> None:
    state = node.state_dir
    modes = (_mode(state), _mode(state / "node.key"), _mode(state / "runtime"))
    assert modes == (0o700, 0o600, 0o755)
    assert node.run("verify").ok().stdout.endswith("all good\n")
    digest = hashlib.sha256(b"weights").hexdigest()
    blob = state / "models" / "blobs" / "sha256" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    blob.chmod(0o644)
    state.chmod(0o755)
    (state / "node.key").chmod(0o640)
    (state / "runtime" / "jobs.json").write_text("{}")
    (state / "runtime" / "jobs.json").chmod(0o664)

    drift = node.run("verify")

    assert drift.exit_code == 1
    assert drift.stdout.splitlines()[:-1] == [
        f"BAD  state folder {state}: mode 0755, expected 0700",
        f"BAD  node key {state}/node.key: mode 0640, expected 0600",
        f"BAD  runtime file {state}/runtime/jobs.json: mode 0664, expected 0644",
        f"BAD  model blob {digest[:12]}: mode 0644, expected 0444",
    ]
    node.init("http://127.0.0.1:9/", simulator.roots[1]).ok()
    assert (_mode(state), _mode(state / "node.key"), _mode(blob)) == (0o700, 0o600, 0o444)
    assert _mode(state / "runtime" / "jobs.json") == 0o644
    assert node.run("verify").ok().stdout.endswith("all good\n")


def test_a_state_group_gets_a_0750_state_folder_that_verify_accepts(
    make_node: Any, simulator: RepositorySimulator, file_server: Any, stranger: Stranger
) -> None:
    node = make_node(file_server.url, simulator.roots[1], RECONCILER_STATE_GROUP=stranger.group)
    st = node.state_dir.stat()
    assert (st.st_mode & 0o7777, st.st_gid) == (0o750, stranger.gid)
    assert _mode(node.state_dir / "node.key") == 0o600  # the group never reads the key
    assert node.run("verify").ok().stdout.endswith("all good\n")
    os.chown(node.state_dir, -1, 0)
    assert f"state folder {node.state_dir}: group is gid 0, not {stranger.group}" in (
        node.run("verify").stdout
    )


# ---- check_trusted itself: symlinks, sticky folders, missing paths ---------------------------


def test_a_symlink_is_followed_and_its_target_checked_like_the_file(
    tmp_path: Path, stranger: Stranger
) -> None:
    target = tmp_path / "real" / "config.toml"
    target.parent.mkdir()
    target.write_text("")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert check_trusted(link, what="settings file") is True

    target.chmod(0o666)
    with pytest.raises(UntrustedPathError) as caught:
        check_trusted(link, what="settings file")
    assert caught.value.one_line() == (
        f"settings file {link}: file {target} is writable by group and others"
    )
    target.chmod(0o644)

    os.lchown(link, stranger.uid, -1)  # in a sticky folder its owner could replace the link
    with pytest.raises(UntrustedPathError, match=re.escape(f"is owned by {stranger.described}")):
        check_trusted(link, what="settings file")

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UntrustedPathError, match="loop of symlinks"):
        check_trusted(loop, what="hook")


def test_a_sticky_root_folder_passes_a_missing_path_is_false_an_unknown_group_is_an_error(
    tmp_path: Path, stranger: Stranger
) -> None:
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert check_trusted(sticky, what="folder") is True  # like /tmp
    assert check_trusted(sticky / "absent" / "file", what="file") is False
    theirs = sticky / "theirs"
    theirs.mkdir()
    os.chown(theirs, stranger.uid, -1)
    with pytest.raises(UntrustedPathError, match="is owned by"):
        check_trusted(theirs / "absent", what="file")  # they could create it at any time
    with pytest.raises(SettingsError, match="strict_modes_group 'no-such-group-x' is not a group"):
        check_trusted(sticky, what="folder", group="no-such-group-x")
