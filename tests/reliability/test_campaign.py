"""The crash campaign's quick version: 20 SIGKILLs of ``reconcile once``, each survived.

``python -m tests.reliability.campaign --kills 500`` runs this same test with more kills
(docs/reliability.md has the figures). The seed is random unless RECONCILER_CAMPAIGN_SEED is
set; a failure names it, so the exact sequence can be replayed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.reliability.agent import hookless_agent
from tests.reliability.campaign import (
    KILLS_ENV,
    REPORT_ENV,
    SEED_ENV,
    run_campaign,
)
from tests.reliability.standalone import write_report
from tests.support.fileserver import FileServer
from tests.support.origin_fixtures import NodeUnderTest
from tests.support.podman_fixtures import PodmanService
from tests.support.signing import RepositorySimulator

pytestmark = [pytest.mark.podman, pytest.mark.slow]

# Read at import: the node fixtures clear every RECONCILER_* variable before the test runs.
KILLS = int(os.environ.get(KILLS_ENV, "20"))
REPORT = os.environ.get(REPORT_ENV)
SEED = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))


@pytest.mark.timeout(0 if KILLS > 20 else 600)
def test_every_kill_of_once_is_followed_by_a_converging_once(
    node: NodeUnderTest,
    simulator: RepositorySimulator,
    file_server: FileServer,
    podman_clean: PodmanService,
    test_images: dict[str, str],
    tmp_path: Path,
) -> None:
    report = run_campaign(
        kills=KILLS,
        seed=SEED,
        agent=hookless_agent(node.env, podman_url=podman_clean.url, scratch=tmp_path),
        simulator=simulator,
        images=test_images,
        watched=(tmp_path,),
        state_dir=node.state_dir,
        # The long run on demand counts every failure; the quick one stops at the first.
        stop_on_failure=KILLS <= 20,
    )
    write_report(report, REPORT)
    print(report.line())
    assert report.failures == [], f"seed {SEED}: " + "\n".join(report.failures)
    assert report.kills == KILLS, f"seed {SEED}: only {report.kills} kills in {report.rounds}"
    assert report.survived == report.kills
    # Only a pass that was really cut short may be recorded as interrupted.
    assert report.interrupted_receipts <= report.kills
