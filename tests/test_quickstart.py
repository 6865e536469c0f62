"""The README's quick start, typed as written: it must end converged and verified clean.

The two shell blocks of the quick start (the network's side, then the node's side) are taken
from README.md and run by bash in a folder holding a copy of docs/examples, against a private
Podman service. Three things differ from a person typing them, each for the test's sake: the
web server's port is a free one instead of 8080, the script waits until that server answers,
and `reconcile watch` is stopped with SIGINT after a few seconds instead of Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.podman_fixtures import PodmanService, free_port

pytestmark = pytest.mark.podman

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the quick start has a block per side"
    return blocks[:2]


def _as_test_script(blocks: list[str], *, port: int) -> str:
    lines = ["set -euo pipefail"]
    for line in "\n".join(blocks).splitlines():
        line = line.replace("8080", str(port))
        if line.startswith("reconcile watch"):
            line = "timeout --preserve-status -s INT 6 " + line
        lines.append(line)
        if "http.server" in line:
            lines.append(
                f'for _ in $(seq 100); do python3 -c "import urllib.request as u; '
                f"u.urlopen('http://127.0.0.1:{port}/head.json')\" 2>/dev/null && break; "
                "sleep 0.1; done"
            )
    return "\n".join(lines) + "\n"


def test_the_readme_quick_start_converges_and_verifies(
    podman_clean: PodmanService, tmp_path: Path
) -> None:
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    script = _as_test_script(_quick_start_blocks(), port=free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["CONTAINER_HOST"] = podman_clean.url

    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "converged on serial 2" in done.stdout
    assert "all good" in done.stdout  # reconcile verify
    installed = tmp_path / "node/state/models/tiny-llm/v1/config.json"
    assert (
        installed.read_bytes()
        == (ROOT / "docs/examples/models/tiny-llm/v1/config.json").read_bytes()
    )
    jobs = json.loads((tmp_path / "node/state/runtime/jobs.json").read_text())
    assert jobs["max_tokens"] == 4096
