"""The atheris harness, run for a bounded time in the default test run (skipped without atheris).

The harness runs in a subprocess: libFuzzer ends the process when it finds a crash, and it
must not take pytest with it. RECONCILER_FUZZ_S sets the time (default 15 s).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_S = int(os.environ.get("RECONCILER_FUZZ_S", "15"))
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris is not installed"
)


def test_fuzz_harness_runs_clean_for_a_bounded_time(tmp_path: Path) -> None:
    from tests.fuzz.harness import seed_corpus

    corpus = tmp_path / "corpus"
    seed_corpus(corpus)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.harness",
            f"-max_total_time={FUZZ_S}",
            "-timeout=10",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=FUZZ_S + 120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, done.stderr[-3000:]
    runs = [line for line in done.stderr.splitlines() if line.startswith("Done ")]
    assert runs, done.stderr[-2000:]  # libFuzzer's closing line: "Done N runs in S second(s)"


def test_harness_lets_anything_but_a_verdict_escape(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The harness must be able to fail: a parser bug (here, a stand-in) is not swallowed."""
    from tests.fuzz import harness

    harness.seed_corpus(tmp_path)
    for seed in tmp_path.iterdir():
        harness.check(seed.read_bytes())  # valid documents pass quietly
    harness.check(b"\x03{not json")  # a verdict (JsonError) is not a crash

    def broken(data: bytes) -> object:
        raise TypeError("stand-in for a parser bug")

    monkeypatch.setattr(harness, "loads_strict", broken)
    with pytest.raises(TypeError, match="stand-in"):
        harness.check(b"\x03{}")
