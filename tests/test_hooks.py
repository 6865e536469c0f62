"""``reconciler.hooks``: real bash hooks in a temporary folder, run as real subprocesses."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from reconciler.runtime.hooks import OUTPUT_CAP, run_hook


def _hook(folder: Path, body: str, *, name: str = "pre-apply", executable: bool = True) -> Path:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n", encoding="utf-8")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _wait_for_file(path: Path, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return path.read_text()


def test_a_hook_gets_its_environment_runs_in_the_hooks_folder_and_reports_its_exit(
    tmp_path: Path,
) -> None:
    _hook(tmp_path, 'echo "digest=$RECONCILE_CONFIG_DIGEST cwd=$PWD"; echo oops >&2; exit 4')

    result = run_hook(
        tmp_path, "pre-apply", env={"RECONCILE_CONFIG_DIGEST": "sha256:ab"}, timeout_s=10
    )

    assert result.ran is True
    assert result.exit_code == 4
    assert result.ok is False
    assert result.timed_out is False
    assert result.output == f"digest=sha256:ab cwd={tmp_path}\noops\n"
    assert result.to_json()["exit_code"] == 4


def test_a_hook_that_succeeds_is_ok(tmp_path: Path) -> None:
    _hook(tmp_path, "echo fine", name="post-apply")

    result = run_hook(tmp_path, "post-apply", env={}, timeout_s=10)

    assert (result.ran, result.exit_code, result.ok, result.output) == (True, 0, True, "fine\n")


@pytest.mark.parametrize("state", ["missing", "not-executable", "a-folder"])
def test_a_missing_or_non_executable_hook_is_not_run(tmp_path: Path, state: str) -> None:
    marker = tmp_path / "ran"
    if state == "not-executable":
        _hook(tmp_path, f"touch {marker}", executable=False)
    if state == "a-folder":
        (tmp_path / "pre-apply").mkdir()

    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=10)

    assert (result.ran, result.exit_code, result.ok, result.output) == (False, None, True, "")
    assert not marker.exists()


def test_the_timeout_kills_the_whole_process_group_including_a_forked_child(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    _hook(
        tmp_path,
        f"sleep 300 & echo $! > {pids}.child\n"
        f"( trap '' TERM; sleep 300 ) & echo $! > {pids}.subshell\n"
        f"echo $$ > {pids}; echo waiting; wait",
    )

    started = time.monotonic()
    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=1)

    assert time.monotonic() - started < 5
    assert result.timed_out is True
    assert result.exit_code is None
    assert result.ok is False
    assert result.output.startswith("waiting\n")
    assert result.output.endswith("[killed after 1 s]")
    for which in ("", ".child", ".subshell"):
        pid = int(_wait_for_file(Path(f"{pids}{which}")))
        deadline = time.monotonic() + 5
        while _alive(pid):
            assert time.monotonic() < deadline, f"hook process {which or 'main'} {pid} survived"
            time.sleep(0.05)


def test_a_background_child_holding_the_output_cannot_hold_the_agent_past_the_timeout(
    tmp_path: Path,
) -> None:
    child = tmp_path / "child"
    _hook(tmp_path, f"sleep 300 & echo $! > {child}; echo started; exit 0")

    started = time.monotonic()
    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=1)

    assert time.monotonic() - started < 5
    assert result.exit_code == 0  # the hook itself said yes
    assert result.ok is True
    assert result.timed_out is True
    assert result.output.startswith("started\n")
    pid = int(_wait_for_file(child))
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the background child survived"
        time.sleep(0.05)


def test_what_a_hook_leaves_in_its_group_is_killed_when_it_is_done(tmp_path: Path) -> None:
    child = tmp_path / "child"
    _hook(tmp_path, f"sleep 300 >/dev/null 2>&1 & echo $! > {child}; echo bye")

    started = time.monotonic()
    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=30)

    assert time.monotonic() - started < 5
    assert (result.exit_code, result.timed_out, result.output) == (0, False, "bye\n")
    pid = int(_wait_for_file(child))
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the leftover child survived"
        time.sleep(0.05)


def test_output_is_capped_at_64_kib_and_a_chatty_hook_never_blocks(tmp_path: Path) -> None:
    # 4 MiB, far more than a pipe buffer: the hook must still run to its end.
    _hook(tmp_path, "head -c 4194304 /dev/zero | tr '\\0' x; echo; echo finished >&2; exit 0")

    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=20)

    assert result.exit_code == 0
    assert result.timed_out is False
    assert len(result.output.encode()) == OUTPUT_CAP == 64 * 1024
    assert set(result.output) == {"x"}


def test_a_hook_that_cannot_be_executed_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "pre-apply"
    path.write_text("#!/nonexistent/interpreter\n")
    path.chmod(0o755)

    result = run_hook(tmp_path, "pre-apply", env={}, timeout_s=5)

    assert result.ran is True
    assert result.ok is False
    assert result.exit_code == 126
    assert "cannot run" in result.output


def test_the_hook_environment_extends_the_agents_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERATOR_SETTING", "kept")
    _hook(tmp_path, 'echo "$OPERATOR_SETTING $RECONCILE_RESULT"')

    result = run_hook(tmp_path, "pre-apply", env={"RECONCILE_RESULT": "converged"}, timeout_s=5)

    assert result.output == "kept converged\n"
    assert "RECONCILE_RESULT" not in os.environ
