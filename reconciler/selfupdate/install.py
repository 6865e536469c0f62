"""Install an approved agent release side by side, from verified wheels only.

Where it sits: ``apply.steps.record_applied`` calls ``consider`` after a converged apply
whose snapshot approves another agent version (and no ``agent-update`` hook is installed).
It downloads every wheel through the model store's verified path (mirrors, resume, size and
digest), builds ``agent/releases/<hex>/`` with pip told to use no index and no network, checks
that the environment imports the version approved, and only then selects it (one atomic
write of ``agent/state.json``). The running agent is never touched: the watch loop exits
after the cycle and the supervisor's next start runs the new release (``gate``).

Crash safety: a wheel gets its final name only once its digest matched; an environment
counts only once ``.complete`` is written, after pip and the import check; the selection is
one atomic rename. A SIGKILL at any moment leaves the previous selection in force, and the
next pass resumes the download or rebuilds the environment.

It may not touch the node record, Podman or git, nor leave pip's or httpx's exceptions
escaping: failures are ``TransientError``s (retried next pass) with one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler import __version__
from reconciler.core.agentrelease import (
    AgentRecord,
    AgentRelease,
    Artifact,
    noted_event,
    receipted_up_to,
    refused,
    release_step,
    selected_base,
    selected_release,
)
from reconciler.core.documents import format_time
from reconciler.core.errors import DownloadError, TransientError
from reconciler.disk.atomic import write_atomic
from reconciler.models.download import deadline_for, download_file, new_client
from reconciler.selfupdate.folder import COMPLETE_MARK, RELEASE_ENV, AgentFolder, die_at

__all__ = ["UpdateAsk", "consider", "events_for_receipt", "install_release"]

log = logging.getLogger("reconciler")

STEP_TIMEOUT_S = 300.0  # seconds for one venv or pip run


@dataclass(frozen=True)
class UpdateAsk:
    """What the apply hands over: the approved release and how the node may reach it."""

    release: AgentRelease
    base_url: str | None  # the origin, for relative mirror URLs
    offline: bool
    min_version: str  # the operator's pin: never below it
    at: str  # the time to record


def consider(state_dir: Path, ask: UpdateAsk) -> tuple[str, bool] | None:
    """Act on an approved release that differs from the running agent: a line for the
    receipt and whether anything changed, or None when there is nothing to do (or it was
    done before)."""
    release = ask.release
    if release.version == __version__:
        return None
    folder = AgentFolder.of(state_dir)
    step = release_step(
        folder.read(), release, running_version=__version__, min_version=ask.min_version
    )
    if step in ("running", "failed", "selected", "no-urls"):
        return None  # nothing to do, or (no mirrors) an agent-update hook's business
    if step == "below-pin":
        pin = ask.min_version
        return f"release {release.version} not installed: below agent_min_version {pin}", False
    if step == "base":
        folder.change(lambda r: selected_base(r, at=ask.at, why=f"{release.version} approved"))
        return f"base install {release.version} selected again; it runs at the next start", True
    try:
        install_release(folder, release, base_url=ask.base_url, offline=ask.offline, at=ask.at)
    except TransientError as exc:
        why = exc.one_line()
        folder.change(
            lambda r: noted_event(
                r, event="install-failed", at=ask.at, version=release.version, why=why[:300]
            )
        )
        raise
    return f"release {release.version} ({release.hex[:12]}) installed and selected", True


def events_for_receipt(state_dir: Path) -> list[str]:
    """Agent events (switches, fallbacks) not in a receipt yet, one line each; from now on
    they count as in one (the caller puts them into the receipt it is writing)."""
    folder = AgentFolder.of(state_dir)
    if not folder.record_file.exists():
        return []
    pending = folder.read().unreceipted()
    if not pending:
        return []
    last = max(int(e["n"]) for e in pending)
    folder.change(lambda r: receipted_up_to(r, last))
    order = ("event", "version", "digest", "why", "back_to", "at")
    return [" ".join(f"{k}={e[k]}" for k in order if k in e) for e in pending]


def install_release(
    folder: AgentFolder, release: AgentRelease, *, base_url: str | None, offline: bool, at: str
) -> AgentRecord:
    """Download and verify every wheel, build the environment, select it, collect the old."""
    assert release.wheel is not None
    wheels = [
        _verified_wheel(folder, release.hex, a, base_url=base_url, offline=offline)
        for a in (release.wheel, *release.requires)
    ]
    _build_environment(folder, release, wheels)
    die_at("agent-installed")
    record = folder.change(
        lambda r: selected_release(r, hex_digest=release.hex, version=release.version, at=at)
    )
    die_at("agent-selected")
    # The running release too: it may still be on trial, and its code must stay until it exits.
    running = os.environ.get(RELEASE_ENV)
    removed = folder.collect(record.kept() | ({running} if running else set()))
    log.info(
        "agent: release %s (%s) selected; %d older release(s) removed",
        release.version,
        release.hex[:12],
        len(removed),
    )
    return record


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _verified_wheel(
    folder: AgentFolder, release_hex: str, wheel: Artifact, *, base_url: str | None, offline: bool
) -> Path:
    """The wheel's file under ``downloads/``, verified (downloaded first unless it is there)."""
    final = folder.download_dir(release_hex) / wheel.name
    if final.is_file():
        if final.stat().st_size == wheel.size and _sha256_of(final) == wheel.digest:
            return final
        final.unlink()  # not the pinned bytes: never used, fetched again
    if offline:
        raise DownloadError(f"agent wheel {wheel.name} is not downloaded and the node is offline")
    folder.work.mkdir(parents=True, exist_ok=True)
    partial = folder.work / f"{wheel.hex}.partial"
    with new_client() as client:
        download_file(
            client,
            urls=wheel.urls,
            base_url=base_url,
            dest_partial=partial,
            size=wheel.size,
            digest=wheel.digest,
            progress=None,
            deadline_s=deadline_for(wheel.size),
            label=wheel.name,
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    _sync_folder(final.parent)
    return final


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _base_interpreter(folder: AgentFolder) -> tuple[str, tuple[str, ...]]:
    """The base install's interpreter and site folders: what every release builds on. A
    release learns them from the record, which the base's start gate wrote."""
    if not os.environ.get(RELEASE_ENV):
        return sys.executable, tuple(site.getsitepackages())
    record = folder.read()
    if not record.base_python:
        raise TransientError("agent: the base install's interpreter is not recorded")
    return record.base_python, record.base_site


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (the release must import its own code), no pip configuration, no index."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", RELEASE_ENV} and not k.startswith("PIP_")
    }
    return {**env, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}


def _run(args: list[str], *, what: str) -> str:
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            env=_clean_env(),
            cwd="/",  # nothing in the caller's folder may shadow what the release imports
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransientError(f"agent: {what} failed: {exc}") from exc
    if done.returncode != 0:
        said = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
        raise TransientError(
            f"agent: {what} failed (exit {done.returncode}): {said[-1] if said else 'no output'}"
        )
    return done.stdout.decode(errors="replace").strip()


def _build_environment(folder: AgentFolder, release: AgentRelease, wheels: list[Path]) -> None:
    """``releases/<hex>/``: a venv holding exactly the pinned wheels, which also sees the base
    install's site folders (after its own) for the dependencies the base already has."""
    target = folder.release_dir(release.hex)
    if (target / COMPLETE_MARK).is_file():
        return
    shutil.rmtree(target, ignore_errors=True)  # half built by a pass that died
    python, base_site = _base_interpreter(folder)
    _run([python, "-m", "venv", "--without-pip", str(target)], what="creating the environment")
    venv_python = str(target / "bin" / "python")
    purelib = _run(
        [venv_python, "-P", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        what="reading the environment",
    )
    write_atomic(
        Path(purelib) / "_reconciler_base.pth", "".join(f"{s}\n" for s in base_site).encode()
    )
    pip = [python, "-m", "pip", "--isolated", "--python", venv_python, "install"]
    flags = ["--no-index", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"]
    _run([*pip, *flags, *map(str, wheels)], what=f"installing {release.version}")
    found = _run(
        [venv_python, "-P", "-c", "import reconciler; print(reconciler.__version__)"],
        what=f"importing {release.version}",
    )
    if found != release.version:
        shutil.rmtree(target, ignore_errors=True)
        why = f"the wheel approved as {release.version} installs version {found or '?'}"
        at = format_time(time.time())
        folder.change(
            lambda r: refused(r, hex_digest=release.hex, version=release.version, at=at, why=why)
        )
        raise TransientError(f"agent: {why}; refused for good")
    write_atomic(target / COMPLETE_MARK, f"{release.version}\n".encode())
