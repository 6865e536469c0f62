"""Crash campaign: SIGKILL ``reconcile once`` at random moments, then demand convergence.

Each round publishes a random snapshot (``generator``), starts ``reconcile once`` as a real
process, kills it with SIGKILL after a random delay (uniform over the time a whole apply
takes, as measured on this machine during the run), and then runs ``reconcile once`` again.
That second run must exit 0, and ``invariants.converged_problems`` must find nothing: the
containers and model trees are HEAD's, every file matches its digest, no temporary file
is left, ``git fsck`` and ``reconcile verify`` pass, the receipts agree with what runs.
Nothing outside the state folder may change. A run that finished before its kill counts as
a round but not as a kill; the campaign goes on until it has made ``kills`` kills.

From a test (tests/reliability/test_campaign.py, N = 20 in the default run) or on its own::

    python -m tests.reliability.campaign --kills 500 [--seed S] [--report FILE]

On its own it runs that test through pytest, which brings up the private Podman service,
the loopback registry and the test images (tests/support/podman_fixtures.py) and tears them
down afterwards; the figures are printed and written to ``--report`` as JSON.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.agent import AgentCommand, Finished, kill_group
from tests.reliability.generator import SnapshotGenerator
from tests.reliability.invariants import Fingerprint, converged_problems, receipts
from tests.reliability.standalone import run_test_alone
from tests.support.signing import RepositorySimulator

__all__ = ["CampaignReport", "run_campaign"]

KILLS_ENV = "RECONCILER_CAMPAIGN_KILLS"
SEED_ENV = "RECONCILER_CAMPAIGN_SEED"
REPORT_ENV = "RECONCILER_CAMPAIGN_REPORT"


@dataclass
class CampaignReport:
    seed: int
    kills: int = 0  # processes actually killed while running
    survived: int = 0  # kills after which the next `once` converged with every invariant
    rounds: int = 0
    finished_before_kill: int = 0
    interrupted_receipts: int = 0
    seconds: float = 0.0
    apply_seconds_max: float = 0.0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"crash campaign (seed {self.seed}): {self.survived}/{self.kills} kills survived "
            f"in {self.rounds} rounds, {self.seconds:.0f} s"
        )


def run_campaign(
    *,
    kills: int,
    seed: int,
    agent: AgentCommand,
    simulator: RepositorySimulator,
    images: dict[str, str],
    watched: tuple[Path, ...],
    state_dir: Path,
    log: Callable[[str], None] = print,
    stop_on_failure: bool = True,
) -> CampaignReport:
    """Make ``kills`` kills (see the module docstring); return the figures."""
    assert simulator.folder is not None
    report = CampaignReport(seed=seed)
    rng = random.Random(seed)
    generator = SnapshotGenerator(origin=simulator.folder, images=images, seed=seed)
    started = time.monotonic()
    before = Fingerprint.of(*watched, exclude=(state_dir, simulator.folder))
    # The longest a whole `once` took when nobody killed it; delays are drawn below it, so
    # most runs die mid-way instead of finishing first.
    whole_s = 3.0
    receipt_count = 0
    max_rounds = kills * 3 + 5
    while report.kills < kills and report.rounds < max_rounds:
        report.rounds += 1
        simulator.publish(body=generator.next_body())
        what = "; ".join(generator.changes)
        delay = rng.uniform(0.3, whole_s)
        began = time.monotonic()
        process = agent.start("once")
        try:
            process.wait(timeout=delay)
            killed = False
            whole_s = max(whole_s * 0.8, time.monotonic() - began)
        except subprocess.TimeoutExpired:
            killed = True
        kill_group(process)
        process.communicate()
        if killed:
            report.kills += 1
        else:
            report.finished_before_kill += 1
        converging = agent.run("once", "--wait", "60")
        report.apply_seconds_max = max(report.apply_seconds_max, converging.seconds)
        problems = _round_problems(converging, agent.env, serial=simulator.serial)
        after = Fingerprint.of(*watched, exclude=(state_dir, simulator.folder))
        problems += before.changes(after)
        node_receipts = receipts_of(agent.env)
        if len(node_receipts) < receipt_count:
            problems.append(f"receipts went from {receipt_count} to {len(node_receipts)}")
        receipt_count = len(node_receipts)
        if problems:
            failure = (
                f"round {report.rounds} (serial {simulator.serial}, {what}; killed after "
                f"{delay:.2f} s: {killed}): " + " | ".join(problems)
            )
            report.failures.append(failure)
            log(failure)
            if stop_on_failure:
                break
        elif killed:
            report.survived += 1
        if report.rounds % 10 == 0:
            log(f"  {report.rounds} rounds, {report.survived}/{report.kills} kills survived")
    interrupted = [r for r in receipts_of(agent.env) if "interrupted" in str(r.get("error"))]
    report.interrupted_receipts = len(interrupted)
    report.seconds = time.monotonic() - started
    return report


def receipts_of(env: dict[str, str]) -> list[dict[str, object]]:
    from tests.reliability.invariants import open_node

    return [payload for _oid, payload in receipts(open_node(env))]


def _round_problems(converging: Finished, env: dict[str, str], *, serial: int) -> list[str]:
    problems = []
    if converging.exit_code != 0:
        tail = (converging.stdout + converging.stderr).strip().splitlines()[-3:]
        problems.append(f"next once exit {converging.exit_code}: {' / '.join(tail)}")
    # Converged, and on what the network published last: not held, not left behind.
    from tests.reliability.invariants import open_node

    node = open_node(env)
    head = node.history.head_oid()
    head_serial = node.history.info(head).serial if head else None
    if head_serial != serial:
        problems.append(f"HEAD is serial {head_serial}, the network is at {serial}")
    if node.state.hold:
        problems.append(f"on hold: {node.state.hold_reason}")
    return problems + converged_problems(env)


# ---- on its own ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.campaign")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to survive")
    parser.add_argument("--seed", type=int, default=None, help="replay a campaign")
    parser.add_argument("--report", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    report = args.report or Path(f"campaign-{int(time.time())}.json")
    env = {KILLS_ENV: str(args.kills), REPORT_ENV: str(report.resolve())}
    if args.seed is not None:
        env[SEED_ENV] = str(args.seed)
    test_file = Path(__file__).resolve().parent / "test_campaign.py"
    return run_test_alone(test_file, env=env, report=report)


if __name__ == "__main__":
    sys.exit(main())
