"""Staged rollouts (docs/contract.md §8): which nodes a head admits, and from when.

Where it sits: in the pure core. Trust uses it to refuse a malformed ``rollout`` in a head
(through ``Head.from_payload``), the node asks it whether it may take the head's snapshot
now, and the network's tools ask it who falls into which wave. Pure: no I/O, no clock
(callers pass ``now``), no logging.

Rules:
* A head without ``rollout`` admits every node at once.
* A node's position is fixed by the salt and its public key alone, so the network can compute
  every node's wave in advance. It is kept as whole hundredths (0..9999) so that comparing it
  with a percent is integer arithmetic and no float rounding can move a node across a wave.
* The percent in force is that of the last wave whose ``at`` has come (0 before the first);
  a node is in when its position is below it.
* A snapshot a node stored but may not take yet is remembered with the rollout that keeps it
  out (``RolloutWait``, kept in the node record), so that ``status``, ``watch`` and the moment
  the wave opens need neither the head nor the network again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.core.documents import format_time, parse_time

if TYPE_CHECKING:
    from reconciler.core.documents import Head

__all__ = [
    "MAX_SALT_CHARS",
    "MAX_WAVES",
    "Admission",
    "Entry",
    "Position",
    "Rollout",
    "RolloutError",
    "RolloutWait",
    "Wave",
    "admission",
    "admits",
    "describe",
    "entry",
    "head_position",
    "percent_now",
    "position",
    "salt_of",
]

MAX_WAVES = 32
MAX_SALT_CHARS = 64
_SCALE = 10000  # positions are hundredths of a percent: 0..9999
_PUBLIC_KEY_BYTES = 32


class RolloutError(ValueError):
    """A rollout breaks a rule of docs/contract.md §8; the message names the wave and the rule."""


@dataclass(frozen=True, order=True)
class Position:
    """Where a node stands in [0, 100), in hundredths of a percent (3721 is 37.21 %)."""

    hundredths: int

    def __post_init__(self) -> None:
        if not 0 <= self.hundredths < _SCALE:
            raise ValueError(f"a position is 0..{_SCALE - 1} hundredths, not {self.hundredths}")

    def __str__(self) -> str:
        return f"{self.hundredths // 100}.{self.hundredths % 100:02d}"

    def below(self, percent: int) -> bool:
        """position < percent, exactly."""
        return self.hundredths < percent * 100

    @classmethod
    def parse(cls, text: str) -> Position:
        """``37.21`` back to 3721 hundredths: exactly two decimals, as ``str`` writes them."""
        whole, dot, fraction = text.partition(".")
        if not (dot and whole.isdigit() and fraction.isdigit() and len(fraction) == 2):
            raise ValueError(f"a position is written like 37.21, not {text!r}")
        return cls(int(whole) * 100 + int(fraction))


@dataclass(frozen=True)
class Wave:
    at: int  # epoch seconds, whole
    percent: int  # 0..100


@dataclass(frozen=True)
class Entry:
    """The wave that lets a node in: the first whose percent is above its position."""

    wave: int  # 1-based, as operators count waves
    at: int  # epoch seconds


@dataclass(frozen=True)
class Admission:
    """How a node came into a rollout: the wave that let it in, and where it stood."""

    wave: int  # 1-based
    wave_at: int  # when that wave opened, epoch seconds
    position: Position


@dataclass(frozen=True)
class Rollout:
    """A head's ``rollout``; constructing one checks every rule of §8, so each one is valid."""

    waves: tuple[Wave, ...]
    salt: str | None = None

    def __post_init__(self) -> None:
        _check_salt(self.salt)
        if not 1 <= len(self.waves) <= MAX_WAVES:
            raise RolloutError(f"rollout has {len(self.waves)} waves, 1 to {MAX_WAVES} allowed")
        for number, wave in enumerate(self.waves, start=1):
            if isinstance(wave.percent, bool) or not 0 <= wave.percent <= 100:
                raise RolloutError(f"rollout wave {number} percent {wave.percent} is not 0 to 100")
        for number in range(2, len(self.waves) + 1):
            earlier, wave = self.waves[number - 2], self.waves[number - 1]
            if wave.at <= earlier.at:
                raise RolloutError(
                    f"rollout wave {number} `at` {format_time(wave.at)} "
                    f"is not after wave {number - 1}'s"
                )
            if wave.percent < earlier.percent:
                raise RolloutError(
                    f"rollout wave {number} percent {wave.percent} "
                    f"is below wave {number - 1}'s {earlier.percent}"
                )

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> Rollout:
        """From a payload its schema has already checked (shapes, 1 to 32 waves, 0 to 100)."""
        waves = tuple(Wave(at=parse_time(w["at"]), percent=w["percent"]) for w in obj["waves"])
        return cls(waves=waves, salt=obj.get("salt"))

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "waves": [{"at": format_time(w.at), "percent": w.percent} for w in self.waves]
        }
        if self.salt is not None:
            body["salt"] = self.salt
        return body

    def paused(self, now: float) -> Rollout:
        """Frozen at the percent in force at ``now``, for every later time.

        The waves that have opened stay as they are and the ones still to come are dropped, so
        the percent in force is unchanged at every moment up to ``now`` (even for a node whose
        clock is behind) and stays there afterwards. Before the first wave the rollout freezes
        at 0 % from ``now``.
        """
        opened = tuple(w for w in self.waves if w.at <= now)
        return Rollout(waves=opened or (Wave(at=int(now), percent=0),), salt=self.salt)

    def followed_by(self, waves: Sequence[Wave]) -> Rollout:
        """These waves appended: the result must still keep every rule."""
        return Rollout(waves=(*self.waves, *waves), salt=self.salt)


def _check_salt(salt: str | None) -> None:
    if salt is None:
        return
    if not 1 <= len(salt) <= MAX_SALT_CHARS:
        raise RolloutError(
            f"rollout salt has {len(salt)} characters, 1 to {MAX_SALT_CHARS} allowed"
        )
    try:
        salt.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate (\ud800); it has no UTF-8 form to hash.
        raise RolloutError("rollout salt is not valid Unicode (a lone surrogate)") from None


def position(salt: str, public_key: bytes) -> Position:
    """A node's position: sha256(salt UTF-8, NUL, 32 public-key bytes), first 8 bytes, mod 10000."""
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise ValueError(f"a node public key is {_PUBLIC_KEY_BYTES} bytes, not {len(public_key)}")
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + public_key).digest()
    return Position(int.from_bytes(digest[:8], "big") % _SCALE)


def salt_of(rollout: Rollout | None, config_digest: str) -> str:
    """The rollout's salt, or by default the head's ``config_digest`` string."""
    if rollout is not None and rollout.salt is not None:
        return rollout.salt
    return config_digest


def head_position(head: Head, public_key: bytes) -> Position:
    """This node's position under ``head``."""
    return position(salt_of(head.rollout, head.config_digest), public_key)


def percent_now(rollout: Rollout | None, now: float) -> int:
    """The percent of the last wave whose ``at`` <= now; 0 before the first, 100 without one."""
    if rollout is None:
        return 100
    percent = 0
    for wave in rollout.waves:
        if wave.at > now:
            break
        percent = wave.percent
    return percent


def entry(rollout: Rollout, place: Position) -> Entry | None:
    """When a node at ``place`` enters; None when no wave reaches it.

    Percents never go down, so the first wave above the position is the one that lets it in,
    whether that wave has opened already or not.
    """
    for number, wave in enumerate(rollout.waves, start=1):
        if place.below(wave.percent):
            return Entry(wave=number, at=wave.at)
    return None


def admits(rollout: Rollout | None, place: Position, now: float) -> bool:
    """Whether a node at ``place`` may take the head's snapshot at ``now``."""
    return place.below(percent_now(rollout, now))


def describe(rollout: Rollout | None, place: Position, now: float) -> str:
    """One phrase for ``status``: the percent in force, this node's place, when it enters."""
    if rollout is None:
        return "no rollout: every node takes it at once"
    head = f"rollout {percent_now(rollout, now)} % now, this node at {place} %"
    found = entry(rollout, place)
    if found is None:
        return f"{head}, no wave reaches it"
    when = format_time(found.at)
    if found.at <= now:
        return f"{head}, in since {when} (wave {found.wave})"
    return f"{head}, enters at {when} (wave {found.wave})"


def admission(rollout: Rollout, place: Position, now: float) -> Admission | None:
    """The wave that has let a node at ``place`` in by ``now``; None while it is still out.

    The same answer as ``admits``: the entry wave has opened exactly when the percent in force
    is above the position, because percents never go down.
    """
    found = entry(rollout, place)
    if found is None or found.at > now:
        return None
    return Admission(wave=found.wave, wave_at=found.at, position=place)


@dataclass(frozen=True, kw_only=True)
class RolloutWait:
    """A stored snapshot that the rollout of the newest head naming it keeps out of HEAD.

    The node record keeps it in the JSON form of ``to_record``; ``from_record`` reads that
    back, and answers None for a form it cannot read (the next accepted head writes it anew).
    """

    digest: str
    serial: int
    position: Position
    rollout: Rollout

    def entry(self) -> Entry | None:
        return entry(self.rollout, self.position)

    def admission(self, now: float) -> Admission | None:
        return admission(self.rollout, self.position, now)

    def describe(self, now: float) -> str:
        return describe(self.rollout, self.position, now)

    def view(self, now: float) -> dict[str, Any]:
        """JSON fields for ``status --json`` and node reports (docs/status.md)."""
        found = self.entry()
        return {
            "position": str(self.position),
            "position_hundredths": self.position.hundredths,
            "percent_now": percent_now(self.rollout, now),
            "wave": found.wave if found else None,
            "enters_at": format_time(found.at) if found else None,
            "in": admits(self.rollout, self.position, now),
            "summary": self.describe(now),
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "serial": self.serial,
            "position": self.position.hundredths,
            "rollout": self.rollout.to_payload(),
        }

    @classmethod
    def from_record(cls, raw: dict[str, Any] | None) -> RolloutWait | None:
        if not raw:
            return None
        try:
            return cls(
                digest=str(raw["digest"]),
                serial=int(raw["serial"]),
                position=Position(int(raw["position"])),
                rollout=Rollout.from_payload(raw["rollout"]),
            )
        except (KeyError, TypeError, ValueError):  # RolloutError is a ValueError too
            return None
