"""The ``reconcile`` command (docs/contract.md §6): parse arguments, call the workflow, map errors.

The CLI is the outermost layer: it builds ``Settings`` and a ``Node``, calls one workflow
function, prints one line (or one JSON object) and exits with the contract's code. Project
errors become ``reconcile: <one line>`` on stderr; nothing else is caught here, so a bug
still shows its traceback. Heavy modules are imported inside the commands that need them:
``reconcile --version`` and ``status`` must start fast.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from reconciler import __version__

if TYPE_CHECKING:
    from reconciler.network.rollout import RolloutChange

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["main"]


def _fail(message: str, code: int) -> None:
    click.echo(f"reconcile: {message}", err=True)
    sys.exit(code)


def _mapped(func: F) -> F:
    """Turn the project's own errors into one line and the contract's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from reconciler.core.errors import ReconcilerError

        try:
            return func(*args, **kwargs)
        except ReconcilerError as exc:
            _fail(exc.one_line(), exc.exit_code)
        return None

    return wrapper  # type: ignore[return-value]


class _Context:
    def __init__(self, config: str | None, overrides: dict[str, Any]) -> None:
        self.config = config
        self.overrides = overrides

    def settings(self, **more: Any) -> Any:
        from reconciler.config.settings import load_settings

        return load_settings(config=self.config, overrides={**self.overrides, **more})

    def node(self) -> Any:
        from reconciler.history.node import Node

        return Node(self.settings())


pass_ctx = click.make_pass_decorator(_Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reconcile")
@click.option("--config", "config", metavar="FILE", help="Settings file (env RECONCILER_CONFIG).")
@click.option("--state-dir", metavar="DIR", help="State folder (env RECONCILER_STATE_DIR).")
@click.option("--podman-url", metavar="URL", help="Podman API (env CONTAINER_HOST).")
@click.option("--hooks-dir", metavar="DIR", help="Folder of pre-apply/post-apply hooks.")
@click.option("--log-format", type=click.Choice(["human", "json"]), help="Log line format.")
@click.pass_context
def cli(
    ctx: click.Context,
    config: str | None,
    state_dir: str | None,
    podman_url: str | None,
    hooks_dir: str | None,
    log_format: str | None,
) -> None:
    """Keep this node on the network's signed configuration snapshot."""
    ctx.obj = _Context(
        config,
        {
            "state_dir": state_dir,
            "podman_url": podman_url,
            "hooks_dir": hooks_dir,
            "log_format": log_format,
        },
    )


# ---- node commands ------------------------------------------------------------------------


@cli.command()
@click.option("--origin", required=True, help="Base URL of the origin (http, https or file).")
@click.option(
    "--root",
    "root_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Trusted root envelope.",
)
@click.option(
    "--network", type=click.Choice(["testnet", "mainnet"]), help="Defaults to the root's."
)
@pass_ctx
@_mapped
def init(ctx: _Context, origin: str, root_file: str, network: str | None) -> None:
    """Write the settings, create the state repository and the node key."""
    from reconciler.agent.provision import initialise

    settings_path, summary = initialise(
        config=ctx.config,
        overrides=ctx.overrides,
        origin=origin,
        root_file=Path(root_file),
        network=network,
    )
    click.echo(
        f"initialised {summary.state_dir} (network {summary.network}, root v{summary.root_version})"
    )
    click.echo(f"settings    {settings_path}")
    click.echo(f"node key    {summary.public_key}")


@cli.command()
@pass_ctx
@_mapped
def fetch(ctx: _Context) -> None:
    """Poll the origin once; store a new verified snapshot; apply nothing."""
    from reconciler.disk.lock import state_lock
    from reconciler.intake.fetch import fetch as do_fetch

    node = ctx.node()
    with state_lock(node.paths.lock, wait_s=30):
        result = do_fetch(node)
    click.echo(result.message)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_ctx
@_mapped
def status(ctx: _Context, as_json: bool) -> None:
    """HEAD, applied, converged, hold, waiting, quarantined, stale, last error, models."""
    from reconciler.report.status import format_status, status_report

    report = status_report(ctx.node())
    click.echo(json.dumps(report, sort_keys=True) if as_json else format_status(report))


@cli.command()
@click.option("-n", "--limit", type=int, default=None, help="Show at most N entries.")
@click.option("--receipts", is_flag=True, help="Show each apply attempt's receipt, decoded.")
@pass_ctx
@_mapped
def log(ctx: _Context, limit: int | None, receipts: bool) -> None:
    """The audit trail in brief (git log in the state folder has it all)."""
    from reconciler.report.status import format_log

    click.echo(format_log(ctx.node(), limit=limit, receipts=receipts))


@cli.command()
@pass_ctx
@_mapped
def verify(ctx: _Context) -> None:
    """Re-check every commit's signatures and digests, every receipt, every model file."""
    from reconciler.report.verify import verify_node

    report = verify_node(ctx.node())
    for finding in report.findings:
        click.echo(f"BAD  {finding.what}: {finding.message}")
    click.echo(report.summary)
    if report.findings:
        sys.exit(1)


def _setup_logging(log_format: str) -> None:
    import logging

    handler = logging.StreamHandler()
    if log_format == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
                        "level": record.levelname.lower(),
                        "logger": record.name,
                        "message": record.getMessage(),
                    }
                )

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root_logger = logging.getLogger("reconciler")
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(logging.INFO)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--exit-code", is_flag=True, help="Exit 3 when changes are pending.")
@pass_ctx
@_mapped
def plan(ctx: _Context, as_json: bool, exit_code: bool) -> None:
    """Show what converging to HEAD would do (contacts no origin, mirror or registry)."""
    from reconciler.apply.edges import StoreEdge, open_edge
    from reconciler.apply.nodeplan import plan_agent, plan_node
    from reconciler.apply.target import load_target
    from reconciler.models.store import ModelStore

    node = ctx.node()
    head = node.history.head_oid()
    if head is None:
        click.echo(json.dumps({"empty": True, "head": None}) if as_json else "no snapshot yet")
        return
    target = load_target(node, head)
    models = StoreEdge(ModelStore(node.paths), settings=node.settings)
    with open_edge(node) as edge:
        node_plan = plan_node(target, runtime_dir=node.paths.runtime, runtime=edge, models=models)
    agent_plan = plan_agent(node, target)
    if as_json:
        click.echo(
            json.dumps({**node_plan.to_json(), "agent": agent_plan.to_json()}, sort_keys=True)
        )
    else:
        click.echo(f"HEAD serial {target.serial} {target.digest}")
        lines = node_plan.describe()
        if not lines and not agent_plan.pending:
            lines = ["nothing to do"]  # what the agent's lines say then is no change
        lines += agent_plan.describe()
        click.echo("\n".join(f"  {line}" for line in lines))
    if exit_code and not (node_plan.empty and not agent_plan.pending):
        sys.exit(3)


@cli.command()
@click.option("--offline", is_flag=True, help="Contact no origin, mirror or registry.")
@click.option(
    "--wait", "wait_s", type=float, default=0.0, help="Wait up to S seconds for the lock."
)
@pass_ctx
@_mapped
def once(ctx: _Context, offline: bool, wait_s: float) -> None:
    """Fetch (unless --offline), then converge, with hooks."""
    from reconciler.agent.loop import run_once

    settings = ctx.settings()
    _setup_logging(settings.log_format)
    from reconciler.history.node import Node

    result = run_once(Node(settings), offline=offline, wait_s=wait_s)
    if result.converge is not None:
        click.echo(result.converge.message)
    if result.fetch_error is not None:
        click.echo(f"reconcile: {result.fetch_error.one_line()}", err=True)
    sys.exit(result.exit_code)


@cli.command()
@click.option(
    "--wait", "wait_s", type=float, default=0.0, help="Wait up to S seconds for the lock."
)
@pass_ctx
@_mapped
def watch(ctx: _Context, wait_s: float) -> None:
    """Fetch and converge forever; SIGHUP polls now, SIGTERM finishes the step and exits."""
    from reconciler.agent.loop import watch as run_watch
    from reconciler.selfupdate.gate import record_running, start_gate

    settings = ctx.settings()
    _setup_logging(settings.log_format)
    # The supervisor always starts this command; the selected agent release runs in its place.
    start_gate(Path(settings.state_dir), settle_s=settings.agent_settle_s, argv=sys.argv[1:])
    record_running(Path(settings.state_dir))
    sys.exit(run_watch(ctx.settings, wait_s=wait_s))


@cli.command()
@click.argument("rev", required=False)
@click.option("--offline", is_flag=True, help="Contact no origin, mirror or registry.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=60.0,
    show_default=True,
    help="Wait up to S seconds for the lock.",
)
@pass_ctx
@_mapped
def rollback(ctx: _Context, rev: str | None, offline: bool, wait_s: float) -> None:
    """Make an earlier snapshot HEAD again (digest, prefix, serial or git rev), hold, converge."""
    from reconciler.agent.control import rollback as do_rollback
    from reconciler.disk.lock import state_lock

    node = ctx.node()
    _setup_logging(node.settings.log_format)
    with state_lock(node.paths.lock, wait_s=wait_s):
        outcome = do_rollback(node, rev, offline=offline)
    click.echo(outcome.message)
    click.echo("automatic advance is on hold until `reconcile resume`")
    sys.exit(0 if outcome.converged else 1)


@cli.command()
@click.option("--offline", is_flag=True, help="Contact no origin, mirror or registry.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=60.0,
    show_default=True,
    help="Wait up to S seconds for the lock.",
)
@pass_ctx
@_mapped
def resume(ctx: _Context, offline: bool, wait_s: float) -> None:
    """Lift the hold and any quarantine; move HEAD to the newest waiting snapshot."""
    from reconciler.agent.control import resume as do_resume
    from reconciler.disk.lock import state_lock

    node = ctx.node()
    _setup_logging(node.settings.log_format)
    with state_lock(node.paths.lock, wait_s=wait_s):
        moved, outcome = do_resume(node, offline=offline)
    click.echo(moved)
    click.echo(outcome.message)


# ---- network operator's commands --------------------------------------------------------


@cli.command()
@click.argument("name", type=click.Path(dir_okay=False))
@_mapped
def keygen(name: str) -> None:
    """Make an Ed25519 key pair NAME.key (0600) and NAME.pub; print its key id."""
    from reconciler.core.envelope import keyid_of
    from reconciler.disk.keys import generate_key

    base = Path(name)
    key = generate_key(base.with_suffix(".key"), base.with_suffix(".pub"))
    click.echo(f"{keyid_of(bytes(key.verify_key))}  {base.with_suffix('.key')}")


def _signers(paths: tuple[str, ...]) -> list[Any]:
    from reconciler.disk.keys import read_private_key

    return [read_private_key(Path(p)) for p in paths]


@cli.command()
@click.option("--version", "version", type=int, required=True, help="Root version N.")
@click.option("--network", type=click.Choice(["testnet", "mainnet"]), required=True)
@click.option("--threshold", type=int, required=True, help="Signatures needed (k of n).")
@click.option(
    "--public", "publics", multiple=True, required=True, help="A trusted key (.pub or .key)."
)
@click.option("--key", "keys", multiple=True, help="Sign with this private key (repeat).")
@click.option("--expires-in", default="365d", show_default=True, help="e.g. 90d, 12h.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Where to write root N."
)
@_mapped
def root(
    version: int,
    network: str,
    threshold: int,
    publics: tuple[str, ...],
    keys: tuple[str, ...],
    expires_in: str,
    out: str,
) -> None:
    """Make root N from a key list and threshold (sign with old and new keys to rotate)."""
    from reconciler.disk.atomic import write_atomic
    from reconciler.disk.keys import read_public_key
    from reconciler.network.publish import make_root, parse_duration

    envelope = make_root(
        version=version,
        network=network,
        threshold=threshold,
        public_keys=[read_public_key(Path(p)) for p in publics],
        expires=int(time.time()) + parse_duration(expires_in),
        signers=_signers(keys),
    )
    write_atomic(Path(out), envelope)
    click.echo(f"wrote root {version} ({len(publics)} keys, threshold {threshold}) to {out}")


@cli.command()
@click.option("--key", "key", required=True, help="This key holder's private key.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write here instead of in place.")
@click.argument("envelope", type=click.Path(exists=True, dir_okay=False))
@_mapped
def sign(key: str, out: str | None, envelope: str) -> None:
    """Add one signature to an envelope (k-of-n signing without a shared key file)."""
    from reconciler.core.envelope import EnvelopeError, add_signature
    from reconciler.core.errors import SettingsError
    from reconciler.disk.atomic import write_atomic

    try:
        signed = add_signature(Path(envelope).read_bytes(), _signers((key,))[0])
    except EnvelopeError as exc:
        raise SettingsError(f"{envelope}: {exc}") from exc
    write_atomic(Path(out or envelope), signed)
    click.echo(f"signed {out or envelope}")


@cli.command()
@click.option(
    "--origin", "origin_dir", required=True, type=click.Path(file_okay=False), help="Origin folder."
)
@click.option("--key", "keys", multiple=True, required=True, help="Sign with this key (repeat).")
@click.option("--expires-in", default="7d", show_default=True, help="Lifetime of head.json.")
@click.option(
    "--refresh-head",
    is_flag=True,
    help="Re-sign only head.json (later expires; rollout kept unless changed).",
)
@click.option(
    "--wave",
    "waves",
    multiple=True,
    metavar="AT=PERCENT",
    help="A rollout wave (repeat): AT is now, +30m, +1h, +2d or YYYY-MM-DDTHH:MM:SSZ.",
)
@click.option("--rollout-salt", metavar="TEXT", help="Place nodes with this salt, not the digest.")
@click.option("--pause", is_flag=True, help="With --refresh-head: freeze at the percent reached.")
@click.option("--resume", is_flag=True, help="With --refresh-head: keep what opened, add --waves.")
@click.option(
    "--chunks",
    "chunks_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Add per-chunk digests to the model files found in this folder.",
)
@click.option(
    "--chunk-size", default="8M", show_default=True, help="With --chunks: bytes per chunk."
)
@click.option(
    "--bt",
    "bt_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Add BitTorrent piece hashes to the model files over 4 MiB found in this folder.",
)
@click.option(
    "--agent-wheel",
    type=click.Path(exists=True, dir_okay=False),
    help="Approve this reconciler wheel as the agent release (copied into ORIGIN/agent/).",
)
@click.option(
    "--agent-url", "agent_urls", multiple=True, metavar="URL", help="A further mirror (repeat)."
)
@click.argument("snapshot", required=False, type=click.Path(exists=True, dir_okay=False))
@_mapped
def publish(
    origin_dir: str,
    keys: tuple[str, ...],
    expires_in: str,
    refresh_head: bool,
    waves: tuple[str, ...],
    rollout_salt: str | None,
    pause: bool,
    resume: bool,
    chunks_dir: str | None,
    chunk_size: str,
    agent_wheel: str | None,
    agent_urls: tuple[str, ...],
    bt_dir: str | None,
    snapshot: str | None,
) -> None:
    """Sign SNAPSHOT (JSON) into ORIGIN as snapshots/<hex>.json and head.json.

    With --chunks DIR, each model file found in DIR (as blobs/sha256/<hex>, NAME/VERSION/PATH
    or PATH) and longer than one chunk gets per-chunk digests (a node re-fetches only a bad
    chunk); with --bt DIR, those over 4 MiB get BitTorrent piece hashes (nodes share them).
    With --agent-wheel FILE, the snapshot approves that wheel as the agent release
    (version, digest, size, urls filled in)."""
    from reconciler.core.errors import SettingsError
    from reconciler.network.publish import parse_duration, publish_snapshot
    from reconciler.network.rollout import RolloutChange, parse_wave, schedule_line

    lifetime = parse_duration(expires_in)
    signers = _signers(keys)
    now = time.time()
    change = RolloutChange(
        waves=tuple(parse_wave(w, now=now) for w in waves),
        salt=rollout_salt,
        pause=pause,
        resume=resume,
    )
    if refresh_head:
        if chunks_dir is not None or bt_dir is not None:
            raise SettingsError("--chunks and --bt need a SNAPSHOT to add the digests to")
        _refresh(Path(origin_dir), signers=signers, now=now, lifetime=lifetime, change=change)
        return
    if snapshot is None:
        raise SettingsError("give a SNAPSHOT file, or --refresh-head")
    rollout = change.new_rollout()
    document = _read_document(Path(snapshot))
    if chunks_dir is not None:
        document = _with_chunks(document, Path(chunks_dir), chunk_size=chunk_size)
    if bt_dir is not None:
        document = _with_torrents(document, Path(bt_dir))
    if agent_wheel is not None:
        document = _with_agent(document, Path(agent_wheel), origin=origin_dir, urls=agent_urls)
    result = publish_snapshot(
        Path(origin_dir), document, signers=signers, now=now, expires_in_s=lifetime, rollout=rollout
    )
    click.echo(f"published serial {result.serial} {result.digest}")
    if result.rollout is not None:
        click.echo(schedule_line(result.rollout, now=now))


def _read_document(snapshot: Path) -> dict[str, Any]:
    from reconciler.core.documents import JsonError, loads_strict
    from reconciler.core.errors import SettingsError

    try:
        document = loads_strict(snapshot.read_bytes())
    except JsonError as exc:
        raise SettingsError(f"{snapshot}: {exc}") from exc
    if not isinstance(document, dict):
        raise SettingsError(f"{snapshot}: not a JSON object")
    return document


def _with_agent(
    document: dict[str, Any], wheel: Path, *, origin: str, urls: tuple[str, ...]
) -> dict[str, Any]:
    """``publish --agent-wheel``: the wheel copied into the origin and approved (§10)."""
    from reconciler.network.agentwheel import with_agent_wheel

    filled = with_agent_wheel(document, wheel, origin=Path(origin), urls=urls)
    click.echo(f"agent: {wheel.name} approved as {filled['updates']['agent']['version']}")
    return filled


def _with_chunks(document: dict[str, Any], folder: Path, *, chunk_size: str) -> dict[str, Any]:
    """``publish --chunks``: the snapshot with chunk digests, and one line saying how many."""
    from reconciler.network.publish import parse_size, with_chunks

    document, filled = with_chunks(document, folder, chunk_bytes=parse_size(chunk_size))
    click.echo(
        f"chunks: {filled.filled} model file(s) given chunk digests, "
        f"{filled.not_found} not found in {folder}, {filled.skipped} left as they were"
    )
    return document


def _with_torrents(document: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``publish --bt``: the snapshot with piece hashes, and one line saying how many."""
    from reconciler.network.torrents import with_torrents

    document, filled = with_torrents(document, folder)
    click.echo(
        f"bt: {filled.filled} model file(s) given piece hashes, "
        f"{filled.not_found} not found in {folder}, {filled.skipped} left as they were"
    )
    return document


def _refresh(
    origin: Path, *, signers: list[Any], now: float, lifetime: int, change: RolloutChange
) -> None:
    from reconciler.network.publish import refresh_head
    from reconciler.network.rollout import revise, schedule_line

    result = refresh_head(
        origin,
        signers=signers,
        now=now,
        expires_in_s=lifetime,
        revise=lambda current: revise(current, change, now=now),
    )
    click.echo(f"head.json re-signed: serial {result.serial}, expires {result.head_expires}")
    if result.rollout is not None:
        click.echo(schedule_line(result.rollout, now=now))


@cli.command()
@click.option(
    "--head",
    "head_path",
    required=True,
    type=click.Path(exists=True),
    help="A head.json, or an origin folder holding one.",
)
@click.option(
    "--nodes",
    "node_paths",
    multiple=True,
    type=click.Path(exists=True),
    help="Node keys (repeat): .pub files, lists of hex keys, node reports, or folders of them.",
)
@click.option("--at", "at", metavar="TIME", help="Look at this time instead of now (+1h, …).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_mapped
def rollout(head_path: str, node_paths: tuple[str, ...], at: str | None, as_json: bool) -> None:
    """Show a head's rollout: when each wave opens, and each node's position and wave."""
    from reconciler.network.rollout import parse_moment, read_head, read_node_keys, view_rollout

    now = time.time()
    moment = parse_moment(at, now=now) if at is not None else now
    keys = read_node_keys((Path(p) for p in node_paths), now=now)
    view = view_rollout(read_head(Path(head_path)), keys, now=moment)
    if as_json:
        click.echo(json.dumps(view.to_json(), sort_keys=True))
    else:
        click.echo("\n".join(view.describe()))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Write a page here.")
@click.option("--network", type=click.Choice(["testnet", "mainnet"]), help="Default: the head's.")
@click.option("--head", "head_path", type=click.Path(exists=True), help="head.json: its waves.")
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="ttl.heartbeat_s: silent after 3 of them.",
)
@click.option("--now", "at", metavar="TIME", help="Look at this time instead of now (+1h, …).")
@_mapped
def fleet(
    folder: str,
    as_json: bool,
    html_file: str | None,
    network: str | None,
    head_path: str | None,
    heartbeat_s: float,
    at: str | None,
) -> None:
    """Check and count a folder of node reports (FOLDER/nodes/<keyid>.json)."""
    from reconciler.network.fleet import describe, read_fleet
    from reconciler.network.rollout import parse_moment, read_head

    moment = parse_moment(at, now=time.time()) if at is not None else time.time()
    head = read_head(Path(head_path)) if head_path is not None else None
    view = read_fleet(Path(folder), now=moment, network=network, head=head, heartbeat_s=heartbeat_s)
    if html_file is not None:
        from reconciler.network.fleet_page import write_page

        write_page(Path(html_file), view)
    if as_json:
        click.echo(json.dumps(view.to_json(), sort_keys=True))
    else:
        click.echo("\n".join(describe(view)))


def main() -> None:
    cli(prog_name="reconcile")
