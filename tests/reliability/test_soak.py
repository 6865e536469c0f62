"""Soak: ``reconcile watch`` under a publisher and random faults (see soak.py).

30 seconds in the default run; RECONCILER_SOAK_S sets another length (CI may set 180,
``python -m tests.reliability.soak --seconds 1800`` runs half an hour). The figures are
printed and, with RECONCILER_SOAK_REPORT, written as JSON (docs/reliability.md has them).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.reliability.agent import hookless_agent
from tests.reliability.services import PrivatePodman, PrivateRegistry
from tests.reliability.soak import REPORT_ENV, SECONDS_ENV, SEED_ENV, run_soak
from tests.reliability.standalone import write_report
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.signing import RepositorySimulator

pytestmark = [pytest.mark.podman, pytest.mark.slow]

# Read at import: the node fixtures clear every RECONCILER_* variable before the test runs.
SECONDS = float(os.environ.get(SECONDS_ENV) or 30)
REPORT = os.environ.get(REPORT_ENV)
SEED = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))


@pytest.mark.timeout(int(SECONDS) + 600)
def test_watch_survives_a_busy_network_and_random_faults_and_ends_where_it_began(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    test_images: dict[str, str],
    private_podman: tuple[PrivatePodman, PrivateRegistry],
    tmp_path: Path,
) -> None:
    podman, _spare = private_podman
    agent = hookless_agent(node.env, podman_url=podman.url, scratch=tmp_path)

    report = run_soak(
        seconds=SECONDS,
        seed=SEED,
        agent=agent,
        simulator=simulator,
        server=file_server,
        podman=podman,
        images=test_images,
    )
    write_report(report, REPORT)

    assert report.problems == [], f"seed {SEED}: " + "\n".join(report.problems)
    assert report.published >= 3 and report.applies_converged >= 3
    assert report.temporary_files_end == 0
    assert list(agent.cwd.iterdir()) == []
