"""What ``campaign`` and ``soak`` share when run on their own (``python -m tests.reliability.X``).

Each runs its test module through pytest, which brings up the private Podman service, the
loopback registry and the test images and tears them down afterwards; settings reach the
test through environment variables, and its figures come back as a JSON report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["run_test_alone", "write_report"]


def write_report(report: Any, target: str | None) -> None:
    """Write the figures (a dataclass) where ``REPORT_ENV`` said (read at import: fixtures
    clear it)."""
    if target:
        Path(target).write_text(json.dumps(asdict(report), indent=2) + "\n")


def run_test_alone(test_file: Path, *, env: Mapping[str, str], report: Path) -> int:
    """Run ``test_file`` through pytest with ``env`` set, print the ``report`` it wrote and
    return pytest's exit code."""
    import pytest

    os.environ.update(env)
    code = pytest.main([str(test_file), "-q", "-s", "-p", "no:cacheprovider", "-o", "timeout=0"])
    if report.exists():
        print(json.dumps(json.loads(report.read_text()), indent=2))
    return int(code)
