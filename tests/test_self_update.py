"""Agent releases (docs/contract.md §10) with real wheels, real pip and a supervising loop.

The wheels are built once per module from this source tree at other version numbers
(``pip wheel --no-build-isolation``, hatchling installed by ``.ci/setup``): a good one, one
that crashes when its CLI is imported, and one that runs but never converges. The origin is
the 127.0.0.1 file server; ``publish --agent-wheel``'s code copies each wheel into it. The
supervisor is a bounded shell loop around the base command, as docs/deployment.md shows.
Everything is judged from ``status --json``, ``agent/state.json``, the receipts and the
processes themselves.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import __version__
from reconciler.network.agentwheel import with_agent_wheel
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.scenarios import AGENT_COMMAND, receipts, snapshot_body, write_hook
from tests.support.signing import RepositorySimulator

BASE = __version__
pytestmark = pytest.mark.podman

SOURCE = Path(__file__).resolve().parents[1]
FAST_TTL = {"poll_s": 1, "heartbeat_s": 30, "retry_min_s": 1, "retry_max_s": 2, "cache_s": 86400}

# What each test release changes in the copied tree: (file, text that must be there, new text).
CRASH = ("reconciler/cli.py", "\ndef main(", '\nraise RuntimeError("release crashes")\ndef main(')
STUCK = (
    "reconciler/agent/loop.py",
    "    outcome = converge(node, offline=offline, full_verify=full_verify)\n",
    "    from reconciler.core.errors import TransientError\n\n"
    '    raise TransientError("this release never converges")\n',
)
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation")
RELEASES = {"good": ("0.2.0", None), "crash": ("0.3.0", CRASH), "stuck": ("0.4.0", STUCK)}


def _build_wheel(root: Path, name: str, version: str, patch: tuple[str, str, str] | None) -> Path:
    tree = root / name
    for part in ("reconciler", "schemas"):
        shutil.copytree(SOURCE / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(SOURCE / part, tree / part)
    edits = [
        ("pyproject.toml", f'version = "{BASE}"', f'version = "{version}"'),
        ("reconciler/__init__.py", f'__version__ = "{BASE}"', f'__version__ = "{version}"'),
        *([patch] if patch else []),
    ]
    for file, old, new in edits:
        text = (tree / file).read_text()
        assert old in text, f"{file} no longer has {old!r}: update this test's patch"
        (tree / file).write_text(text.replace(old, new, 1))
    out = root / "dist"
    subprocess.run(
        [*PIP_WHEEL, "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out / f"reconciler-{version}-py3-none-any.whl"


def _build_extra(root: Path) -> Path:
    """A wheel of a tiny package that a release ``requires`` and the base install lacks."""
    tree = root / "extra"
    (tree / "agentextra").mkdir(parents=True)
    (tree / "agentextra" / "__init__.py").write_text("VALUE = 42\n")
    (tree / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "agentextra"\nversion = "1.0"\n'
    )
    subprocess.run(
        [*PIP_WHEEL, "-w", str(root / "dist"), str(tree)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = (root / "dist").glob("agentextra-1.0-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agent-wheels")
    built = {name: _build_wheel(root, name, v, p) for name, (v, p) in RELEASES.items()}
    return {**built, "extra": _build_extra(root)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _publish(
    simulator: RepositorySimulator, server: FileServer, wheel: Path, **agent: Any
) -> dict[str, Any]:
    body = with_agent_wheel(snapshot_body(ttl=FAST_TTL), wheel, origin=server.root)
    body["updates"]["agent"].update(agent)
    simulator.publish(body=body)
    return dict(body["updates"]["agent"])


@pytest.fixture
def podman_url(podman_service: PodmanService) -> str:
    return podman_service.url


def _env(node: NodeUnderTest, tmp_path: Path, podman: str, **more: str) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    return {
        **os.environ,
        **node.env,
        "RECONCILER_DISK_RESERVE_BYTES": "0",
        "RECONCILER_HOOKS_DIR": str(hooks),
        "RECONCILER_PODMAN_URL": podman,
        **more,
    }


def _payload(envelope: Path) -> dict[str, Any]:
    data = json.loads(base64.b64decode(json.loads(envelope.read_bytes())["payload"]))
    assert isinstance(data, dict)
    return data


def _record(node: NodeUnderTest) -> dict[str, Any]:
    data = json.loads((node.state_dir / "agent" / "state.json").read_bytes())
    assert isinstance(data, dict)
    return data


def _agent(node: NodeUnderTest) -> dict[str, Any]:
    agent = node.status()["agent"]
    assert isinstance(agent, dict)
    return agent


def _wait_for(what: str, check: Callable[[], bool], *, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}; supervisor log:\n{log.read_text()[-6000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def supervised(env: dict[str, str], log: Path, *, starts: int) -> Iterator[subprocess.Popen[bytes]]:
    """The shell-loop supervisor of docs/deployment.md, bounded to ``starts`` starts."""
    script = 'for i in $(seq "$0"); do "$@" watch; echo "supervisor: exit $?" >&2; done'
    with log.open("ab") as err:
        loop = subprocess.Popen(
            ["bash", "-c", script, str(starts), *AGENT_COMMAND],
            env=env,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield loop
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(loop.pid, signal.SIGKILL)
        loop.wait(timeout=10)
        _wait_for_group_gone(loop.pid)


def _wait_for_group_gone(pgid: int, *, timeout_s: float = 10.0) -> None:
    """Until no live process of the group is left: the shell has exited, but its ``watch``
    may not have, and it holds the agent lock until it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_live_member(stat, pgid) for stat in Path("/proc").glob("[0-9]*/stat")):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {pgid} still run {timeout_s} s after SIGKILL")


def _live_member(stat: Path, pgid: int) -> bool:
    try:
        fields = stat.read_text().rpartition(")")[2].split()
    except OSError:
        return False  # gone while we looked
    return fields[0] != "Z" and int(fields[2]) == pgid


def _running_python(agent: dict[str, Any]) -> str:
    return Path(f"/proc/{agent['agent_pid']}/cmdline").read_bytes().split(b"\0")[0].decode()


# ---- the health gate under a supervisor ------------------------------------------------------


def test_good_release_runs_then_a_crashing_one_is_abandoned_for_the_previous(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    wheels: dict[str, Path],
    tmp_path: Path,
    podman_url: str,
) -> None:
    good, crash = _sha(wheels["good"]), _sha(wheels["crash"])
    extra = wheels["extra"]
    file_server.write(f"wheels/{extra.name}", extra.read_bytes())
    needs = {"name": extra.name, "digest": f"sha256:{_sha(extra)}", "size": extra.stat().st_size}
    needs["urls"] = [f"wheels/{extra.name}"]
    _publish(simulator, file_server, wheels["good"], requires=[needs])
    log = tmp_path / "supervisor.log"
    with supervised(_env(node, tmp_path, podman_url), log, starts=12):
        _wait_for(
            "ran 0.2.0 as good",
            lambda: _agent(node)["agent_version"] == "0.2.0" and _agent(node)["state"] == "good",
            timeout_s=60,
            log=log,
        )
        agent = _agent(node)
        assert agent["selected"]["digest"] == f"sha256:{good}"
        assert agent["base_version"] == BASE and agent["previous"] is None
        release = node.state_dir / "agent" / "releases" / good
        assert (release / ".complete").is_file()
        assert _running_python(agent) == str(release / "bin" / "python")
        # The pinned extra wheel is in the release's environment, not in the base install.
        probe = ["-P", "-c", "import agentextra; print(agentextra.VALUE)"]
        inside = subprocess.run([release / "bin" / "python", *probe], capture_output=True)
        assert inside.stdout == b"42\n", inside.stderr
        assert subprocess.run([sys.executable, *probe], capture_output=True).returncode == 1
        steps = [s for r in receipts(node, node.refs()["refs/heads/main"]) for s in r["steps"]]
        assert any(s["step"] == "agent" and "0.2.0" in s["detail"] for s in steps), steps

        _publish(simulator, file_server, wheels["crash"])
        _wait_for(
            "abandoned 0.3.0",
            lambda: (
                [f["version"] for f in _agent(node)["failed"]] == ["0.3.0"]
                and _agent(node)["agent_version"] == "0.2.0"
            ),
            timeout_s=60,
            log=log,
        )
        time.sleep(3)  # a few more cycles of 0.2.0: it must not try 0.3.0 again
        agent = _agent(node)
    text = log.read_text()
    assert text.count("release crashes") >= 3
    assert [f"start {n} of 3" in text for n in (1, 2, 3)] == [True] * 3
    # Start-gate events are log lines when they happen (a receipt only at the next apply).
    assert f"agent: release 0.2.0 ({good[:12]}) is good: it converged" in text
    assert f"agent: release 0.3.0 ({crash[:12]}) abandoned: 3 starts in a row" in text
    assert agent["selected"]["digest"] == f"sha256:{good}" and agent["state"] == "good"
    record = _record(node)
    assert record["releases"][crash]["state"] == "failed"
    assert record["releases"][crash]["starts"] == 3
    assert "3 starts in a row" in record["releases"][crash]["why"]
    events = [(e["event"], e.get("version")) for e in record["events"]]
    assert events.count(("selected", "0.3.0")) == 1, events
    assert ("abandoned", "0.3.0") in events
    assert sorted(p.name for p in (node.state_dir / "agent" / "releases").iterdir()) == sorted(
        [good, crash]
    )


def test_release_that_never_converges_is_abandoned_for_the_base(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    wheels: dict[str, Path],
    tmp_path: Path,
    podman_url: str,
) -> None:
    stuck = _sha(wheels["stuck"])
    _publish(simulator, file_server, wheels["stuck"])
    log = tmp_path / "supervisor.log"
    env = _env(node, tmp_path, podman_url, RECONCILER_AGENT_SETTLE_S="3")
    with supervised(env, log, starts=10):
        _wait_for(
            "abandoned 0.4.0",
            lambda: bool(_agent(node)["failed"]) and _agent(node)["agent_version"] == BASE,
            timeout_s=60,
            log=log,
        )
        agent = _agent(node)
    text = log.read_text()
    assert text.count("this release never converges") >= 3
    # SIGALRM (14) ended each trial: the settle time, enforced across exec by the kernel.
    assert text.count("supervisor: exit 142") == 3, text[-4000:]
    assert agent["selected"] is None and agent["state"] is None
    assert agent["failed"][0]["digest"] == f"sha256:{stuck}"
    assert _record(node)["releases"][stuck]["starts"] == 3

    # The fallback goes into the next apply's receipt (and no further one).
    simulator.publish(body=snapshot_body(ttl=FAST_TTL))
    renv = {k: v for k, v in env.items() if k.startswith("RECONCILER_")}
    assert node.run("once", env=renv).exit_code == 0
    steps = [s for r in receipts(node, node.refs()["refs/heads/main"]) for s in r["steps"]]
    events = [s["detail"] for s in steps if s["step"] == "agent-event"]
    assert any(e.startswith("event=abandoned version=0.4.0") for e in events), steps
    assert any("back_to=base" in e for e in events), events


# ---- refusals and operator control (one `once` each, in-process) -----------------------------


def test_wrong_wheel_digest_is_refused_before_anything_is_installed(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    wheels: dict[str, Path],
    tmp_path: Path,
    podman_url: str,
) -> None:
    wrong = "sha256:" + hashlib.sha256(b"another wheel").hexdigest()
    _publish(simulator, file_server, wheels["good"], digest=wrong)
    env = {k: v for k, v in _env(node, tmp_path, podman_url).items() if k.startswith("RECONCILER_")}
    outcome = node.run("once", env=env)
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr  # the node did converge
    agent_dir = node.state_dir / "agent"
    assert not (agent_dir / "releases").exists()
    assert not (agent_dir / "downloads").exists()
    assert not list((agent_dir / "work").glob("*.partial"))
    event = _agent(node)["events"][-1]
    assert event["event"] == "install-failed" and "digest" in event["why"].lower(), event
    steps = [s for r in receipts(node, node.refs()["refs/heads/main"]) for s in r["steps"]]
    assert [s["step"] for s in steps if s["step"] == "agent"] == ["agent"]
    assert _agent(node)["selected"] is None


def test_hook_replaces_installer_and_the_off_switch_and_the_pin_install_nothing(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    wheels: dict[str, Path],
    tmp_path: Path,
    podman_url: str,
) -> None:
    agent = _publish(simulator, file_server, wheels["good"])
    env = {k: v for k, v in _env(node, tmp_path, podman_url).items() if k.startswith("RECONCILER_")}
    releases = node.state_dir / "agent" / "releases"

    pinned = node.run("once", env={**env, "RECONCILER_AGENT_MIN_VERSION": "0.3.0"})
    assert pinned.exit_code == 0, pinned.stderr
    assert not releases.exists()
    steps = [s for r in receipts(node, node.refs()["refs/heads/main"]) for s in r["steps"]]
    assert any("below agent_min_version 0.3.0" in s["detail"] for s in steps), steps

    off = node.run("once", env={**env, "RECONCILER_SELF_UPDATE": "false"})
    assert off.exit_code == 0, off.stderr
    assert not releases.exists()
    shown = node.run("status", "--json", env={"RECONCILER_SELF_UPDATE": "false"})
    assert json.loads(shown.stdout)["agent"]["self_update"] is False

    seen = tmp_path / "hook-saw"
    write_hook(
        tmp_path / "hooks",
        "agent-update",
        f'echo "$RECONCILE_AGENT_VERSION $RECONCILE_AGENT_DIGEST" > {seen}',
    )
    hooked = node.run("once", env=env)
    assert hooked.exit_code == 0, hooked.stderr
    assert seen.read_text().split() == ["0.2.0", agent["digest"]]
    assert not releases.exists()


def test_publish_agent_wheel_fills_the_release(
    node: NodeUnderTest, wheels: dict[str, Path], tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    assert node.run("keygen", str(tmp_path / "k1")).exit_code == 0
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps(snapshot_body()))
    wheel = wheels["good"]
    done = node.run(
        "publish", "--origin", str(origin), "--key", str(tmp_path / "k1.key"),
        "--agent-wheel", str(wheel), "--agent-url", "https://mirror.example/a.whl", str(snapshot),
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    head = _payload(origin / "head.json")
    payload = _payload(
        origin / "snapshots" / f"{head['config_digest'].removeprefix('sha256:')}.json"
    )
    assert payload["updates"]["agent"] == {
        "version": "0.2.0",
        "digest": f"sha256:{_sha(wheel)}",
        "size": wheel.stat().st_size,
        "urls": [f"agent/{wheel.name}", "https://mirror.example/a.whl"],
    }
    assert (origin / "agent" / wheel.name).read_bytes() == wheel.read_bytes()


# ---- crash safety and the offline node -------------------------------------------------------


def _agent_process(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [*AGENT_COMMAND, *args], env=env, stdout=err, stderr=err, start_new_session=True
        )


def test_sigkill_in_install_and_switch_then_offline_switch_leaves_a_working_agent(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    wheels: dict[str, Path],
    tmp_path: Path,
    podman_url: str,
) -> None:
    good = _sha(wheels["good"])
    _publish(simulator, file_server, wheels["good"])
    env = _env(node, tmp_path, podman_url)
    log = tmp_path / "agent.log"
    agent_dir = node.state_dir / "agent"
    release = agent_dir / "releases" / good

    # 1. SIGKILL (the whole process group, pip with it) while the environment is being built.
    first = _agent_process(env, "once", log=log)
    _wait_for("built an environment", release.exists, timeout_s=60, log=log)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert not (release / ".complete").exists()
    assert _agent(node)["selected"] is None
    wheel_path = f"/agent/{wheels['good'].name}"
    fetched = file_server.stats.requests(wheel_path)
    assert fetched == 1

    # 2. Offline, from the wheel already downloaded; SIGKILL right after the selection.
    second = _agent_process(
        {**env, "RECONCILER_TEST_DIE_AT": "agent-selected"}, "once", "--offline", log=log
    )
    assert second.wait(timeout=120) == -signal.SIGKILL, log.read_text()[-3000:]
    assert (release / ".complete").is_file()
    assert _record(node)["selected"] == good
    assert _record(node)["releases"][good] == {
        "version": "0.2.0",
        "state": "trial",
        "starts": 0,
        "since": _record(node)["releases"][good]["since"],
    }

    # 3. SIGKILL in the start gate, after the start was counted and before the exec.
    third = _agent_process({**env, "RECONCILER_TEST_DIE_AT": "agent-counted"}, "watch", log=log)
    assert third.wait(timeout=60) == -signal.SIGKILL
    assert _record(node)["releases"][good]["starts"] == 1

    # 4. The supervisor's next start runs the release, which proves itself.
    with supervised(env, log, starts=4):
        _wait_for(
            "ran 0.2.0 as good",
            lambda: _agent(node)["agent_version"] == "0.2.0" and _agent(node)["state"] == "good",
            timeout_s=60,
            log=log,
        )
    assert _record(node)["releases"][good]["starts"] == 2
    assert file_server.stats.requests(wheel_path) == fetched  # nothing fetched again


# ---- the rules, as a table (pure) ------------------------------------------------------------


def test_release_record_transitions() -> None:
    from reconciler.core.agentrelease import (
        AgentRecord,
        abandoned,
        is_below,
        marked_good,
        next_start,
        selected_release,
        started,
    )

    a, b = "a" * 64, "b" * 64
    record = selected_release(AgentRecord(), hex_digest=a, version="0.2.0", at="t1")
    assert (record.selected, record.previous) == (a, None)  # the base is the fallback
    assert next_start(record, installed=set()).abandon is not None  # no environment: never run
    for count in (1, 2, 3):
        decision = next_start(record, installed={a})
        assert (decision.run, decision.trial) == (a, True)
        record = started(record, at="t")
        assert record.entry(a).starts == count  # type: ignore[union-attr]
    assert "3 starts" in str(next_start(record, installed={a}).abandon)
    record = marked_good(record, hex_digest=a, at="t2")
    assert next_start(record, installed={a}).trial is False  # good: no more counting
    record = selected_release(record, hex_digest=b, version="0.3.0", at="t3")
    assert (record.selected, record.previous) == (b, a)
    record = abandoned(record, at="t4", why="crashed")
    assert (record.selected, record.previous) == (a, None)
    assert record.failed(b) and not record.failed(a)
    assert AgentRecord.from_json(record.to_json()) == record
    assert is_below("0.9.1", "0.10.0") and not is_below("0.10.0", "0.9.1")
    from reconciler.core.agentrelease import runtime_update_check

    pin = "sha256:" + "c" * 64
    updates = {"runtime": {"version": "2.0", "digest": pin}}
    assert runtime_update_check(updates, {"llm": f"r/llm@{pin}"})["pinned_by"] == ["llm"]
    assert (
        "not the image"
        in runtime_update_check(updates, {"llm": "r/llm@sha256:" + "d" * 64})["warning"]
    )
    assert runtime_update_check(updates, {})["warning"] is None  # no runtimes: nothing to check
    assert is_below("1.0rc1", "1.0") and not is_below("1.0", "") and not is_below("1.0", "1.0")


def test_self_update_settings_from_the_environment(tmp_path: Path) -> None:
    from reconciler.config.settings import load_settings
    from reconciler.core.errors import SettingsError

    def load(**env: str) -> Any:
        return load_settings(config=str(tmp_path / "none.toml"), environ=env, allow_missing=True)

    assert load().self_update is True and load().agent_settle_s == 600
    assert load(RECONCILER_SELF_UPDATE="off").self_update is False
    assert load(RECONCILER_AGENT_MIN_VERSION="0.3.0").agent_min_version == "0.3.0"
    with pytest.raises(SettingsError, match="neither true nor false"):
        load(RECONCILER_SELF_UPDATE="maybe")
    with pytest.raises(SettingsError, match="agent_settle_s"):
        load(RECONCILER_AGENT_SETTLE_S="0")
