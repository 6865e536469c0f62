"""Agent releases (docs/contract.md §10): what a snapshot approves, and the release record.

Pure: values and their transitions only. ``selfupdate`` reads and writes the record
(``<state>/agent/state.json``), downloads and installs; the start gate asks ``next_start``
what to run. Every change of the record is a named transition here, each taking the record
and explicit values (times are passed in) and returning a new record, so that a release's
life (trial, good, failed) can be checked as a table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "MAX_STARTS",
    "AgentRecord",
    "AgentRelease",
    "Artifact",
    "ReleaseEntry",
    "StartDecision",
    "abandoned",
    "base_seen",
    "is_below",
    "marked_good",
    "next_start",
    "noted_event",
    "receipted_up_to",
    "refused",
    "release_step",
    "runtime_update_check",
    "selected_base",
    "selected_release",
    "started",
]

MAX_STARTS = 3  # starts in a row without a converged cycle before a release is abandoned
MAX_EVENTS = 20  # switches and fallbacks kept in the record for `status`

ReleaseState = Literal["trial", "good", "failed"]
# What the built-in installer does about an approved release (docs/contract.md §10, 2 to 5).
ReleaseStep = Literal["running", "failed", "selected", "below-pin", "base", "no-urls", "install"]


@dataclass(frozen=True)
class Artifact:
    """One wheel to install: its file name (pip needs a wheel's name), size, digest, mirrors."""

    name: str
    digest: str
    size: int
    urls: tuple[str, ...]

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class AgentRelease:
    """``updates.agent`` of a snapshot: the wheel of this project and the wheels it needs."""

    version: str
    digest: str
    wheel: Artifact | None  # None when the snapshot gives no ``urls``: nothing to download
    requires: tuple[Artifact, ...]

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @classmethod
    def from_updates(cls, updates: dict[str, Any]) -> AgentRelease | None:
        agent = updates.get("agent") or {}
        version, digest = agent.get("version"), agent.get("digest")
        if not isinstance(version, str) or not isinstance(digest, str):
            return None
        urls = tuple(agent.get("urls", ()))
        wheel = None
        if urls:
            wheel = Artifact(
                name=_wheel_name(urls[0], version),
                digest=digest,
                size=int(agent["size"]),
                urls=urls,
            )
        requires = tuple(
            Artifact(name=r["name"], digest=r["digest"], size=int(r["size"]), urls=tuple(r["urls"]))
            for r in agent.get("requires", ())
        )
        return cls(version=version, digest=digest, wheel=wheel, requires=requires)


def _wheel_name(url: str, version: str) -> str:
    """The wheel's file name: the first mirror's last path segment when it is one, else the
    name a pure-Python wheel of this project at ``version`` has."""
    last = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if re.fullmatch(r"[A-Za-z0-9_.+-]+\.whl", last):
        return last
    return f"reconciler-{version}-py3-none-any.whl"


def _version_key(version: str, length: int) -> tuple[tuple[float, int | str], ...]:
    # Numbers compare as numbers, other parts as text, and a missing part sits between the
    # two: 1.10 > 1.9, 1.0.1 > 1.0 > 1.0rc1. Enough for this project's versions; not PEP 440.
    parts = re.findall(r"\d+|[A-Za-z]+", version.split("+", 1)[0])
    key: list[tuple[float, int | str]] = [
        (1, int(p)) if p.isdigit() else (0, p.lower()) for p in parts
    ]
    return tuple(key + [(0.5, "")] * (length - len(key)))


def is_below(version: str, floor: str) -> bool:
    """Whether ``version`` is older than the operator's pin ``floor`` (empty: no pin)."""
    if not floor:
        return False
    length = max(len(version), len(floor))
    return _version_key(version, length) < _version_key(floor, length)


@dataclass(frozen=True)
class ReleaseEntry:
    version: str
    state: ReleaseState
    starts: int  # starts of this trial so far (each counted before it is exec'd)
    since: str  # when it entered this state
    why: str | None = None  # why it failed


@dataclass(frozen=True)
class AgentRecord:
    """``agent/state.json``: the selected and previous release (digest hex or None for the
    base install), every release met and its state, the base install, recent events."""

    selected: str | None = None
    previous: str | None = None
    releases: tuple[tuple[str, ReleaseEntry], ...] = ()
    base_version: str | None = None
    base_python: str | None = None
    base_site: tuple[str, ...] = ()
    events: tuple[tuple[tuple[str, str], ...], ...] = ()
    events_total: int = 0  # events ever noted; each event's "n" is its number
    receipted: int = 0  # events up to this number are in an apply receipt already

    def entry(self, hex_digest: str | None) -> ReleaseEntry | None:
        return dict(self.releases).get(hex_digest) if hex_digest else None

    def failed(self, hex_digest: str) -> bool:
        entry = self.entry(hex_digest)
        return entry is not None and entry.state == "failed"

    def kept(self) -> set[str]:
        """Release folders garbage collection keeps: the selected and the previous."""
        return {h for h in (self.selected, self.previous) if h}

    def to_json(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "previous": self.previous,
            "releases": {
                h: {"version": e.version, "state": e.state, "starts": e.starts, "since": e.since}
                | ({"why": e.why} if e.why else {})
                for h, e in self.releases
            },
            "base": {
                "version": self.base_version,
                "python": self.base_python,
                "site": list(self.base_site),
            },
            "events": [dict(e) for e in self.events],
            "events_total": self.events_total,
            "receipted": self.receipted,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AgentRecord:
        base = obj.get("base") or {}
        return cls(
            selected=obj.get("selected"),
            previous=obj.get("previous"),
            releases=tuple(
                (str(h), ReleaseEntry(**{k: e[k] for k in e if k in _ENTRY_FIELDS}))
                for h, e in (obj.get("releases") or {}).items()
            ),
            base_version=base.get("version"),
            base_python=base.get("python"),
            base_site=tuple(base.get("site") or ()),
            events=tuple(tuple(sorted(e.items())) for e in obj.get("events") or ()),
            events_total=int(obj.get("events_total", 0)),
            receipted=int(obj.get("receipted", 0)),
        )

    def unreceipted(self) -> list[dict[str, str]]:
        """Events no apply receipt carries yet (a start gate's fallback, a good mark)."""
        return [dict(e) for e in self.events if int(dict(e).get("n", "0")) > self.receipted]


_ENTRY_FIELDS = {"version", "state", "starts", "since", "why"}


def _with_entry(record: AgentRecord, hex_digest: str, entry: ReleaseEntry) -> AgentRecord:
    others = tuple((h, e) for h, e in record.releases if h != hex_digest)
    return replace(record, releases=(*others, (hex_digest, entry)))


def noted_event(record: AgentRecord, **fields: str) -> AgentRecord:
    """An event (``event``, ``at``, …) appended; only the last ``MAX_EVENTS`` are kept."""
    number = record.events_total + 1
    kept = {**{k: v for k, v in fields.items() if v}, "n": str(number)}
    event = tuple(sorted(kept.items()))
    return replace(record, events=(*record.events, event)[-MAX_EVENTS:], events_total=number)


def receipted_up_to(record: AgentRecord, number: int) -> AgentRecord:
    """Events up to ``number`` went into an apply receipt."""
    return replace(record, receipted=max(record.receipted, number))


def base_seen(
    record: AgentRecord, *, version: str, python: str, site: tuple[str, ...]
) -> AgentRecord:
    """The base install as its own start found it (its interpreter and site folders are what
    every release environment builds on)."""
    return replace(record, base_version=version, base_python=python, base_site=site)


def _good_or_none(record: AgentRecord, hex_digest: str | None) -> str | None:
    entry = record.entry(hex_digest)
    return hex_digest if entry is not None and entry.state == "good" else None


def selected_release(record: AgentRecord, *, hex_digest: str, version: str, at: str) -> AgentRecord:
    """A verified, installed release becomes the selected one, on trial; the one selected
    before becomes the previous if it had proved itself (else the previous stays)."""
    prior = _good_or_none(record, record.selected) or record.previous
    if record.selected is None:
        prior = None  # the base install is always there to fall back to
    changed = replace(record, selected=hex_digest, previous=prior)
    changed = _with_entry(
        changed, hex_digest, ReleaseEntry(version=version, state="trial", starts=0, since=at)
    )
    return noted_event(changed, event="selected", at=at, version=version, digest=hex_digest)


def selected_base(record: AgentRecord, *, at: str, why: str) -> AgentRecord:
    """The base install runs again by choice (the snapshot approves the base's version)."""
    changed = replace(
        record, selected=None, previous=_good_or_none(record, record.selected) or record.previous
    )
    return noted_event(changed, event="selected-base", at=at, why=why)


def started(record: AgentRecord, *, at: str) -> AgentRecord:
    """One more start of the selected release while on trial (counted before the exec)."""
    entry = record.entry(record.selected)
    if entry is None or entry.state != "trial" or record.selected is None:
        return record
    return _with_entry(record, record.selected, replace(entry, starts=entry.starts + 1))


def marked_good(record: AgentRecord, *, hex_digest: str, at: str) -> AgentRecord:
    """The release completed a converged cycle: it stays, whatever happens to its starts."""
    entry = record.entry(hex_digest)
    if entry is None or entry.state != "trial":
        return record
    changed = _with_entry(record, hex_digest, replace(entry, state="good", since=at))
    return noted_event(changed, event="good", at=at, version=entry.version, digest=hex_digest)


def abandoned(record: AgentRecord, *, at: str, why: str) -> AgentRecord:
    """The selected release failed: recorded as failed for good, and the previous release
    (if it proved itself) or the base install is selected again."""
    hex_digest = record.selected
    entry = record.entry(hex_digest)
    if hex_digest is None or entry is None:
        return replace(record, selected=None)
    changed = _with_entry(record, hex_digest, replace(entry, state="failed", since=at, why=why))
    back = _good_or_none(changed, record.previous)
    changed = replace(changed, selected=back, previous=None)
    return noted_event(
        changed,
        event="abandoned",
        at=at,
        version=entry.version,
        digest=hex_digest,
        why=why,
        back_to=back or "base",
    )


def refused(
    record: AgentRecord, *, hex_digest: str, version: str, at: str, why: str
) -> AgentRecord:
    """A release whose verified wheels do not make the release approved (another version
    inside): failed for that digest without ever being selected."""
    changed = _with_entry(
        record,
        hex_digest,
        ReleaseEntry(version=version, state="failed", starts=0, since=at, why=why),
    )
    return noted_event(changed, event="refused", at=at, version=version, digest=hex_digest, why=why)


def release_step(
    record: AgentRecord, release: AgentRelease, *, running_version: str, min_version: str
) -> ReleaseStep:
    """The installer's rule, in its order, for an agent at ``running_version``: the apply
    acts on it and ``plan`` tells it, so the two cannot disagree."""
    if release.version == running_version:
        return "running"
    if record.failed(release.hex):
        return "failed"  # never tried again for that digest
    if record.selected == release.hex:
        return "selected"  # waits for the next start
    if is_below(release.version, min_version):
        return "below-pin"
    if record.selected is not None and release.version == record.base_version:
        return "base"
    if release.wheel is None:
        return "no-urls"  # only an agent-update hook can act on it
    return "install"


@dataclass(frozen=True)
class StartDecision:
    """What a start of the base command runs: ``run`` is a release's hex or None (the base);
    ``trial`` says whether this start is counted; ``abandon`` why the selection must go."""

    run: str | None
    trial: bool = False
    abandon: str | None = None


def next_start(record: AgentRecord, *, installed: set[str]) -> StartDecision:
    """The start gate's rule: a release on trial gets ``MAX_STARTS`` starts in a row."""
    hex_digest = record.selected
    entry = record.entry(hex_digest)
    if hex_digest is None:
        return StartDecision(run=None)
    if entry is None or hex_digest not in installed:
        return StartDecision(run=None, abandon="its environment is missing or incomplete")
    if entry.state == "failed":
        return StartDecision(run=None, abandon=entry.why or "failed")
    if entry.state == "good":
        return StartDecision(run=hex_digest)
    if entry.starts >= MAX_STARTS:
        return StartDecision(
            run=None,
            abandon=f"{entry.starts} starts in a row ended before a converged cycle",
        )
    return StartDecision(run=hex_digest, trial=True)


def runtime_update_check(updates: dict[str, Any], images: dict[str, str]) -> dict[str, Any]:
    """``updates.runtime`` against the images the snapshot pins (``images``: runtime name to
    ``repo@sha256:…``): the approved runtime is the image digest some runtime runs. A
    snapshot with runtimes of which none pins it gets a warning, never a rejection: the
    images are what the node runs, the approval is what the network says it wants run."""
    runtime = updates.get("runtime") or {}
    digest = runtime.get("digest")
    pinned_by = sorted(name for name, image in images.items() if image.endswith(f"@{digest}"))
    warning = None
    if images and not pinned_by:
        warning = (
            f"updates.runtime {runtime.get('version')} ({str(digest)[:19]}…) is not the image "
            f"of any runtime ({', '.join(sorted(images))})"
        )
    return {
        "version": runtime.get("version"),
        "digest": digest,
        "pinned_by": pinned_by,
        "warning": warning,
    }
