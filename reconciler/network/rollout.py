"""The network's side of staged rollouts (docs/contract.md §8): waves from the command line, changes
to a published head's rollout, and which node falls into which wave.

Edge module (files), used by ``reconcile publish`` and ``reconcile rollout``. The rules of a
rollout and the position formula live in ``core.rollout``; this module only turns an
operator's words into waves, guards a change against contradicting what nodes have already
done, and reads heads and node keys from disk. It signs and writes nothing itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.core.documents import Head, JsonError, format_time, loads_strict, parse_time
from reconciler.core.envelope import HEAD_TYPE, EnvelopeError, parse_envelope
from reconciler.core.errors import SettingsError
from reconciler.core.nodereport import InvalidReportError, check_report
from reconciler.core.rollout import (
    Entry,
    Position,
    Rollout,
    Wave,
    entry,
    percent_now,
    position,
    salt_of,
)
from reconciler.core.schema import SchemaError, validate
from reconciler.network.publish import parse_duration

__all__ = [
    "NodeKey",
    "NodePlace",
    "RolloutChange",
    "RolloutView",
    "WaveCount",
    "parse_moment",
    "parse_wave",
    "read_head",
    "read_node_keys",
    "revise",
    "schedule_line",
    "view_rollout",
]

_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}\Z")


# ---- the operator's words -------------------------------------------------------------------


def parse_moment(text: str, *, now: float) -> int:
    """``now``, ``+90m`` / ``+1h`` / ``+2d`` from now, or ``YYYY-MM-DDTHH:MM:SSZ`` → epoch s."""
    if text == "now":
        return int(now)
    if text.startswith("+"):
        return int(now) + parse_duration(text[1:])
    if _TIME.match(text) is None:
        raise SettingsError(f"{text!r} is not a time (now, +30m, +1h, +2d, 2026-12-02T10:00:00Z)")
    try:
        epoch = parse_time(text)
    except ValueError:
        epoch = None
    if epoch is None or format_time(epoch) != text:  # 30 February, second 60…
        raise SettingsError(f"{text!r} is not a real UTC time")
    return epoch


def parse_wave(text: str, *, now: float) -> Wave:
    """``AT=PERCENT`` as given to ``--wave``: ``+1h=5``, ``2026-12-02T10:00:00Z=25%``."""
    moment, equals, amount = text.rpartition("=")
    if not equals or not moment:
        raise SettingsError(f"--wave {text!r}: expected AT=PERCENT, e.g. +1h=5")
    amount = amount.removesuffix("%")
    if not amount.isdigit() or not 0 <= int(amount) <= 100:
        raise SettingsError(f"--wave {text!r}: the percent is a whole number from 0 to 100")
    try:
        at = parse_moment(moment, now=now)
    except SettingsError as exc:
        raise SettingsError(f"--wave {text!r}: {exc}") from exc
    return Wave(at=at, percent=int(amount))


def _rollout(waves: Sequence[Wave], salt: str | None) -> Rollout:
    try:
        return Rollout(waves=tuple(waves), salt=salt)
    except ValueError as exc:
        raise SettingsError(f"refusing this rollout: {exc}") from exc


def schedule_line(rollout: Rollout | None, *, now: float) -> str:
    """``rollout 5 % now: 1 % from T1, 5 % from T2, 100 % from T3`` for the publisher."""
    if rollout is None:
        return "no rollout: every node takes it at once"
    steps = ", ".join(f"{w.percent} % from {format_time(w.at)}" for w in rollout.waves)
    salt = f", salt {rollout.salt!r}" if rollout.salt is not None else ""
    return f"rollout {percent_now(rollout, now)} % now: {steps}{salt}"


# ---- changing a published head's rollout ----------------------------------------------------


@dataclass(frozen=True)
class RolloutChange:
    """What ``publish --refresh-head`` was asked to do to the current rollout."""

    waves: tuple[Wave, ...] = ()  # replace the waves (or, with ``resume``, append them)
    salt: str | None = None
    pause: bool = False
    resume: bool = False

    @property
    def empty(self) -> bool:
        return not (self.waves or self.salt is not None or self.pause or self.resume)

    def new_rollout(self) -> Rollout | None:
        """The rollout of a head for a new snapshot: the waves as given, or none at all."""
        if self.pause or self.resume:
            raise SettingsError("--pause and --resume change a published head: add --refresh-head")
        if not self.waves:
            if self.salt is not None:
                raise SettingsError("--rollout-salt places nodes in waves: give --wave too")
            return None
        return _rollout(self.waves, self.salt)


def revise(current: Rollout | None, change: RolloutChange, *, now: float) -> Rollout | None:
    """The rollout a refreshed head carries: ``current`` changed as asked.

    Nodes never leave a snapshot they took, so a change that would put fewer nodes in than
    are in now (a lower percent in force, or another salt once nodes have entered) is refused
    rather than signed: it would describe a fleet that cannot exist.
    """
    if change.empty:
        return current
    if change.pause and (change.resume or change.waves):
        raise SettingsError("--pause freezes the rollout; it takes no --wave and no --resume")
    if change.resume and not change.waves:
        raise SettingsError("--resume continues a paused rollout: give the next --wave(s)")
    if current is None:
        raise SettingsError(
            "head.json has no rollout: every node may already have taken it, "
            "so it cannot be paused or staged now; publish a new snapshot with --wave"
        )
    salt = change.salt if change.salt is not None else current.salt
    if salt != current.salt and percent_now(current, now) > 0:
        raise SettingsError(
            "the rollout has started: another salt would move nodes between waves, "
            "and the nodes already in would stay in"
        )
    if change.pause:
        revised = _rollout(current.paused(now).waves, salt)
    elif change.resume:
        revised = _rollout((*current.paused(now).waves, *change.waves), salt)
    elif change.waves:
        revised = _rollout(change.waves, salt)
    else:
        revised = _rollout(current.waves, salt)
    reached, offered = percent_now(current, now), percent_now(revised, now)
    if offered < reached:
        raise SettingsError(
            f"the new waves give {offered} % now, below the {reached} % the rollout has "
            f"reached (nodes never leave a snapshot they took): start at {reached} % or more, "
            "or use --resume"
        )
    return revised


# ---- reading what is published ----------------------------------------------------------------


def read_head(path: Path) -> Head:
    """A ``head.json`` envelope, or an origin folder's; checked as a node would, signatures
    aside (this is a planning tool: the file is the operator's own)."""
    file = path / "head.json" if path.is_dir() else path
    try:
        envelope = parse_envelope(file.read_bytes())
        if envelope.payload_type != HEAD_TYPE:
            raise SettingsError(f"{file}: payloadType is {envelope.payload_type!r}, not a head")
        payload = loads_strict(envelope.payload)
        validate("head", payload)
        return Head.from_payload(payload)
    except FileNotFoundError:
        raise SettingsError(f"{file} does not exist") from None
    except (OSError, EnvelopeError, JsonError, SchemaError, ValueError) as exc:
        raise SettingsError(f"{file} is not a valid head: {exc}") from exc


@dataclass(frozen=True)
class NodeKey:
    name: str  # a .pub file's name, a label from a key list, or file:line
    public: bytes  # 32 raw Ed25519 bytes


def read_node_keys(paths: Iterable[Path], *, now: float) -> tuple[NodeKey, ...]:
    """Node public keys from ``.pub`` files, folders of them (searched recursively), text
    files of one hex key per line (optionally followed by a name; ``#`` starts a comment), or
    node reports (``<keyid>.json``, alone or in a folder such as a collector's ``nodes/``).

    A report gives its key only if it verifies as ``reconcile fleet`` checks it (name, signature,
    size, time); one that does not is passed over, since anyone can drop a file into a
    collector's folder. A key listed twice counts once (the first name is kept).
    """
    found: dict[bytes, NodeKey] = {}
    for path in paths:
        if path.is_dir():
            files = [(f, f.relative_to(path).with_suffix("").as_posix()) for f in _listed(path)]
        else:
            files = [(path, path.stem)]
        for file, stem in files:
            keys = _key_of_report(file, now=now) if _is_report(file) else _keys_in(file, stem)
            for key in keys:
                found.setdefault(key.public, key)
    return tuple(found.values())


def _listed(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and (f.suffix == ".pub" or _is_report(f))
    )


def _is_report(file: Path) -> bool:
    return file.suffix == ".json" and _HEX_KEY.match(file.stem) is not None


def _key_of_report(file: Path, *, now: float) -> list[NodeKey]:
    try:
        view = check_report(file.read_bytes(), name=file.name, now=now)
    except (OSError, InvalidReportError):
        return []
    return [NodeKey(name=f"report {view.node[:12]}", public=view.public)]


def _keys_in(file: Path, stem: str) -> list[NodeKey]:
    if file.suffix == ".key":
        raise SettingsError(f"{file} is a private key; give the node's .pub file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SettingsError(f"{file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{file} cannot be read as a key list ({exc})") from exc
    keys = []
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if _HEX_KEY.match(words[0]) is None or len(words) > 2:
            raise SettingsError(
                f"{file}:{number}: expected a 64-hex-digit public key and an optional name"
            )
        default = stem if file.suffix == ".pub" else f"{file.name}:{number}"
        keys.append(
            NodeKey(name=words[1] if len(words) > 1 else default, public=bytes.fromhex(words[0]))
        )
    return keys


# ---- who is in which wave -------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlace:
    node: NodeKey
    position: Position
    entry: Entry | None  # None: no wave reaches it (or there is no rollout)
    is_in: bool


@dataclass(frozen=True)
class WaveCount:
    number: int
    wave: Wave
    opened: bool
    entering: int  # nodes this wave lets in
    total_in: int  # nodes in once it has opened


@dataclass(frozen=True)
class RolloutView:
    head: Head
    at: int
    salt: str
    percent: int
    waves: tuple[WaveCount, ...]
    nodes: tuple[NodePlace, ...]  # by position, then name

    @property
    def unreached(self) -> int:
        return sum(1 for p in self.nodes if p.entry is None and not p.is_in)

    @property
    def in_now(self) -> int:
        return sum(1 for p in self.nodes if p.is_in)

    def to_json(self) -> dict[str, Any]:
        return {
            "head": {
                "serial": self.head.serial,
                "config_digest": self.head.config_digest,
                "issued_at": format_time(self.head.issued_at),
                "expires": format_time(self.head.expires),
            },
            "at": format_time(self.at),
            "rollout": self.head.rollout is not None,
            "salt": self.salt,
            "salt_from": "config_digest" if self.salt == self.head.config_digest else "rollout",
            "percent_now": self.percent,
            "waves": [_wave_json(w) for w in self.waves],
            "unreached": self.unreached,
            "in_now": self.in_now,
            "total": len(self.nodes),
            "nodes": [_place_json(p) for p in self.nodes],
        }

    def describe(self) -> list[str]:
        return [*_header_lines(self), *_wave_lines(self), *_node_lines(self)]


def view_rollout(head: Head, nodes: Sequence[NodeKey], *, now: float) -> RolloutView:
    """Each node's position and wave under ``head``, and how many each wave lets in."""
    rollout = head.rollout
    salt = salt_of(rollout, head.config_digest)
    in_force = percent_now(rollout, now)
    places = []
    for node in nodes:
        place = position(salt, node.public)
        places.append(
            NodePlace(
                node=node,
                position=place,
                entry=entry(rollout, place) if rollout is not None else None,
                is_in=place.below(in_force),
            )
        )
    places.sort(key=lambda p: (p.position, p.node.name))
    counts = []
    for number, wave in enumerate(rollout.waves if rollout is not None else (), start=1):
        counts.append(
            WaveCount(
                number=number,
                wave=wave,
                opened=wave.at <= now,
                entering=sum(1 for p in places if p.entry is not None and p.entry.wave == number),
                total_in=sum(1 for p in places if p.position.below(wave.percent)),
            )
        )
    return RolloutView(
        head=head,
        at=int(now),
        salt=salt,
        percent=in_force,
        waves=tuple(counts),
        nodes=tuple(places),
    )


def _wave_json(count: WaveCount) -> dict[str, Any]:
    return {
        "wave": count.number,
        "at": format_time(count.wave.at),
        "percent": count.wave.percent,
        "open": count.opened,
        "entering": count.entering,
        "in": count.total_in,
    }


def _place_json(place: NodePlace) -> dict[str, Any]:
    return {
        "name": place.node.name,
        "public": place.node.public.hex(),
        "position": str(place.position),
        "position_hundredths": place.position.hundredths,
        "wave": place.entry.wave if place.entry else None,
        "enters": format_time(place.entry.at) if place.entry else None,
        "in": place.is_in,
    }


def _header_lines(view: RolloutView) -> list[str]:
    head = view.head
    salt = "the config_digest" if view.salt == head.config_digest else repr(view.salt)
    lines = [f"head serial {head.serial} {head.config_digest}, salt {salt}"]
    if head.rollout is None:
        lines.append("no rollout: every node takes it at once")
    else:
        lines.append(f"rollout {view.percent} % now ({format_time(view.at)})")
    return lines


def _wave_lines(view: RolloutView) -> list[str]:
    if not view.waves:
        return []
    lines = ["wave  opens                 percent  entering  in after  "]
    upcoming = next((w.number for w in view.waves if not w.opened), None)
    for count in view.waves:
        state = "open" if count.opened else "next" if count.number == upcoming else ""
        lines.append(
            f"{count.number:<4}  {format_time(count.wave.at)}  {count.wave.percent:>5} %"
            f"  {count.entering:>8}  {count.total_in:>8}  {state}".rstrip()
        )
    lines.append(f"{'-':<4}  {'no wave reaches':<20}  {'':>7}  {view.unreached:>8}")
    return [line.rstrip() for line in lines]


def _node_lines(view: RolloutView) -> list[str]:
    if not view.nodes:
        return ["no node keys given"]
    width = max(12, *(len(p.node.name) for p in view.nodes))
    lines = [f"{'node':<{width}}  position  wave  enters                state"]
    for place in view.nodes:
        found = place.entry
        wave = str(found.wave) if found else "-"
        when = format_time(found.at) if found else ("at once" if place.is_in else "never")
        state = "in" if place.is_in else "due" if found else "not reached"
        lines.append(
            f"{place.node.name:<{width}}  {str(place.position) + ' %':>8}  {wave:<4}  "
            f"{when:<20}  {state}"
        )
    lines.append(f"{view.in_now} of {len(view.nodes)} nodes in now")
    return lines
