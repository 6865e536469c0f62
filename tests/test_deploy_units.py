"""The deployment units in docs/deploy/: what this machine can check of them, and nothing more.

* ``reconciler.service`` passes ``systemd-analyze verify`` (no warning at all) and
  ``systemd-analyze security --offline`` rates it OK; its settings say what docs/deployment.md
  says they say.
* ``reconciler.container`` (Quadlet): its mounts are checked as written, and the ``podman run``
  options it stands for are run against the test's private Podman service with a busybox
  image in place of the agent's (same paths inside and out, the socket, read-only settings, a
  read-only root). Generating the service from it needs Quadlet (Podman >= 4.4): skipped, with
  that reason, where Podman is older.
* ``Containerfile``: what it copies exists and its entry point is ``reconcile watch``. Building
  it needs a Python base image and PyPI inside the build, which CI does not have: the image
  is built and run (``reconcile once`` inside it, with the Quadlet's options, converging a
  node) only when ``DEPLOY_TEST_BASE_ROOTFS`` names a root filesystem tar to build on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.config.settings import DEFAULT_CONFIG_PATH, DEFAULT_PODMAN_URL, Settings
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import RepositorySimulator, base_snapshot

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "docs" / "deploy"
SERVICE = DEPLOY / "reconciler.service"
QUADLET = DEPLOY / "reconciler.container"
CONTAINERFILE = DEPLOY / "Containerfile"
STATE_DIR = Settings().state_dir
SOCKET = DEFAULT_PODMAN_URL.removeprefix("unix://")
QUADLET_GENERATORS = (
    Path("/usr/lib/systemd/system-generators/podman-system-generator"),
    Path("/usr/libexec/podman/quadlet"),
)

Unit = dict[str, dict[str, list[str]]]


def read_unit(path: Path) -> Unit:
    """Sections → key → every value, in order (systemd keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"[{section}] {key} is set {len(values)} times"
    return values[0]


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "min": 60, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)\s*(s|min|m|h|)", value)
    assert match, f"{value!r}: write a plain number of seconds or minutes"
    return int(match.group(1)) * units[match.group(2)]


# ---- systemd unit ------------------------------------------------------------------------------


def test_service_unit_has_the_documented_settings() -> None:
    unit = read_unit(SERVICE)
    service = unit["Service"]
    exec_start = shlex.split(one(unit, "Service", "ExecStart"))
    assert exec_start[1:] == ["--config", str(DEFAULT_CONFIG_PATH), "watch"]
    assert one(unit, "Unit", "ConditionPathExists") == str(DEFAULT_CONFIG_PATH)
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert STATE_DIR in one(unit, "Service", "ReadWritePaths").split()
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "Restart") == "always"
    assert _seconds(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # SIGTERM goes to the agent alone, which finishes its step (hooks included).
    assert one(unit, "Service", "KillMode") == "mixed"
    assert "-HUP" in service["ExecReload"][0]


def test_service_stop_timeout_outlasts_a_hook() -> None:
    unit = read_unit(SERVICE)
    assert _seconds(one(unit, "Service", "TimeoutStopSec")) > Settings().hook_timeout_s


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's `reconcile` (verify checks it exists)."""
    reconcile = shutil.which("reconcile")
    if reconcile is None:
        pytest.skip("the reconcile command is not installed (pip install -e .)")
    text = SERVICE.read_text(encoding="utf-8")
    assert "ExecStart=/opt/reconciler/bin/reconcile " in text
    copy = tmp_path / SERVICE.name
    copy.write_text(text.replace("/opt/reconciler/bin/reconcile", reconcile), encoding="utf-8")
    return copy


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    return tool


def test_service_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "verify", str(_verifiable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys; any line it prints is a finding.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_service_unit_is_rated_ok_by_systemd_analyze_security(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(_verifiable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    # The agent runs as root (Podman's socket is root's); 2.x is what that allows.
    assert float(match.group(1)) <= 3.0, result.stdout


# ---- Quadlet unit ------------------------------------------------------------------------------


def _volumes(unit: Unit) -> dict[str, tuple[str, str]]:
    """Container path → (host path, options)."""
    found = {}
    for value in unit["Container"]["Volume"]:
        host, container, *options = value.split(":")
        found[container] = (host, ",".join(options))
    return found


def test_quadlet_mounts_the_state_folder_at_the_same_path_inside_and_out() -> None:
    volumes = _volumes(read_unit(QUADLET))
    assert volumes[STATE_DIR][0] == STATE_DIR
    assert "ro" not in volumes[STATE_DIR][1].split(",")


def test_quadlet_mounts_the_podman_socket_and_read_only_settings() -> None:
    unit = read_unit(QUADLET)
    volumes = _volumes(unit)
    assert volumes[SOCKET][0] == SOCKET
    settings_dir = str(DEFAULT_CONFIG_PATH.parent)
    assert volumes[settings_dir] == (settings_dir, "ro")
    assert one(unit, "Container", "Environment") == f"RECONCILER_CONFIG={DEFAULT_CONFIG_PATH}"
    assert one(unit, "Container", "Exec") == "watch"
    assert one(unit, "Service", "Restart") == "always"
    # The agent's own container must never look like one of the runtime containers it manages.
    assert not one(unit, "Container", "ContainerName").startswith("reconciler-")


_FLAGS = {
    "SecurityLabelDisable": ["--security-opt", "label=disable"],
    "NoNewPrivileges": ["--security-opt", "no-new-privileges"],
    "ReadOnly": ["--read-only"],
}


def _podman_run_options(
    unit: Unit, *, host_paths: dict[str, str], inside_paths: dict[str, str]
) -> list[str]:
    """The `podman run` options Quadlet makes of the [Container] keys this unit uses, with
    volume paths moved (host side and container side separately; the container side's moves
    apply to environment values too)."""
    options: list[str] = []
    section = unit["Container"]
    for key, values in section.items():
        for value in values:
            if key == "Volume":
                host, container, *rest = value.split(":")
                spec = f"{host_paths.get(host, host)}:{inside_paths.get(container, container)}"
                options += ["--volume", spec + (":" + ":".join(rest) if rest else "")]
            elif key == "Environment":
                for old, new in inside_paths.items():
                    value = value.replace(old, new)
                options += ["--env", value]
            elif key in _FLAGS:
                options += _FLAGS[key] if value == "true" else []
            elif key == "DropCapability":
                options += ["--cap-drop", value]
            elif key == "PodmanArgs":
                options += shlex.split(value)
            elif key in {"Image", "Exec", "ContainerName"}:
                continue
            else:
                raise AssertionError(f"the test does not know Quadlet key {key}: teach it")
    return options


@pytest.mark.podman
def test_quadlet_container_options_work_with_podman(
    tmp_path: Path, podman_clean: PodmanService, test_images: dict[str, str]
) -> None:
    """A busybox stand-in for the agent, run with the unit's options and paths moved to tmp."""
    unit = read_unit(QUADLET)
    state = tmp_path / "var-lib-reconciler"
    settings = tmp_path / "etc-reconciler"
    state.mkdir()
    settings.mkdir()
    (settings / "config.toml").write_text('origin = "file:///x/"\n', encoding="utf-8")
    # The state folder moves, but stays the same path inside and out (that is the point);
    # the socket moves on the host side only: inside, it is where the agent looks for it.
    moved = {STATE_DIR: str(state), str(DEFAULT_CONFIG_PATH.parent): str(settings)}
    options = _podman_run_options(
        unit,
        host_paths={**moved, SOCKET: podman_clean.url.removeprefix("unix://")},
        inside_paths=moved,
    )
    script = "; ".join(
        [
            "set -e",
            f"test -S {SOCKET}",
            f'test "$RECONCILER_CONFIG" = {settings}/{DEFAULT_CONFIG_PATH.name}',
            f"cat {settings}/config.toml",
            f"touch {state}/written-inside",
            f"if touch {settings}/x 2>/dev/null; then echo settings-writable; exit 1; fi",
            "if touch /bin/x 2>/dev/null; then echo root-writable; exit 1; fi",
            "echo ok",
        ]
    )
    result = podman_clean.cli(
        "run", "--rm", *options, test_images["sleeper"], "sh", "-c", script, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
    assert (state / "written-inside").exists()


def test_quadlet_generates_a_service_that_systemd_accepts(tmp_path: Path) -> None:
    generator = next((g for g in QUADLET_GENERATORS if g.exists()), None)
    if generator is None:
        version = subprocess.run(
            ["podman", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        pytest.skip(f"no Quadlet generator here ({version or 'no podman'}; Quadlet is 4.4+)")
    units = tmp_path / "quadlet"
    units.mkdir()
    shutil.copy(QUADLET, units / QUADLET.name)
    out = tmp_path / "generated"
    out.mkdir()
    subprocess.run(
        [str(generator), str(out)],
        env={**os.environ, "QUADLET_UNIT_DIRS": str(units)},
        check=True,
        timeout=60,
    )
    generated = out / "reconciler.service"
    assert generated.exists(), list(out.iterdir())
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(generated)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---- Containerfile -----------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_containerfile_copies_what_exists_and_runs_reconcile_watch() -> None:
    steps = _instructions(CONTAINERFILE)
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert ("ENTRYPOINT", '["reconcile"]') in steps
    assert ("CMD", '["watch"]') in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert f"RECONCILER_CONFIG={DEFAULT_CONFIG_PATH}" in env


@pytest.mark.podman
@pytest.mark.slow
def test_the_built_image_converges_a_node_with_the_quadlet_options(
    tmp_path: Path,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    make_node: Callable[..., NodeUnderTest],
) -> None:
    """Containerfile → image → `reconcile once` inside it, run with reconciler.container's
    options against the private Podman service: the runtime container it makes is the host's."""
    rootfs = os.environ.get("DEPLOY_TEST_BASE_ROOTFS")
    if not rootfs:
        pytest.skip(
            "needs a Python base image and PyPI inside the build (CI has neither): set "
            "DEPLOY_TEST_BASE_ROOTFS to a root filesystem tar with python3 >= 3.11 and pip "
            "(docs/deploy/host-python-rootfs.sh makes one)"
        )
    base = "localhost/reconciler-test-base:latest"
    podman_clean.cli("import", rootfs, base, timeout=600)
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    for name in ("reconciler", "schemas", "hooks"):
        shutil.copytree(REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    tag = "localhost/reconciler-test:build"
    build = podman_clean.cli(
        *("build", "--network=host", "--build-arg", f"BASE={base}"),
        *("-f", str(CONTAINERFILE), "-t", tag, str(context)),
        check=False,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        # A network with one runtime, served from a folder (file:// origin).
        origin = tmp_path / "origin"
        simulator = RepositorySimulator(folder=origin)
        simulator.write("models/tiny-llm/config.json", b"abc")
        body = base_snapshot()
        body["runtimes"] = [
            {"name": "probe", "image": test_images["sleeper"], "models": ["tiny-llm:v1"]}
        ]
        simulator.publish(body=body)
        node = make_node(f"file://{origin}/", simulator.roots[1], RECONCILER_DISK_RESERVE_BYTES="0")
        unit = read_unit(QUADLET)
        # Settings, state and origin at the same paths inside and out; the socket where the
        # agent looks for it by default.
        moved = {STATE_DIR: str(node.state_dir), str(DEFAULT_CONFIG_PATH.parent): str(node.home)}
        options = _podman_run_options(
            unit,
            host_paths={**moved, SOCKET: podman_clean.url.removeprefix("unix://")},
            inside_paths=moved,
        )
        options += ["--volume", f"{origin}:{origin}:ro"]
        run = podman_clean.cli("run", "--rm", *options, tag, "once", check=False, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert node.status()["converged"] is True
        names = podman_clean.cli("ps", "--format", "{{.Names}}").stdout.split()
        assert "reconciler-probe" in names
    finally:
        podman_clean.cli("rmi", "--force", tag, base, check=False)
