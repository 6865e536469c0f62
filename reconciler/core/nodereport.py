"""Node reports (docs/contract.md §9): where a report goes, and what a valid one is.

Where it sits: in the pure core, between the node that builds and signs its report
(``report.node_report``) and the network's ``reconcile fleet`` that reads a folder of them
(``network.fleet``); both sides take the rules from here so that they cannot disagree. Pure:
bytes and values in, values out; no I/O and no clock (``check_report`` is given ``now``).

A report is valid when its envelope is at most 64 KiB, its payloadType is the report type,
its payload is strict JSON with the fields below, the file it came in is named by the key
id of the ``public`` key inside, that key signed it, and its ``at`` is not in the future
(a few minutes of clock skew allowed). Anything else is an ``InvalidReportError`` whose message
is the one line ``fleet`` prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from reconciler.core.documents import JsonError, loads_strict, parse_time
from reconciler.core.envelope import (
    REPORT_TYPE,
    EnvelopeError,
    keyid_of,
    parse_envelope,
    valid_keyids,
)

__all__ = [
    "CLOCK_SKEW_S",
    "MAX_REPORT_BYTES",
    "InvalidReportError",
    "ReportView",
    "check_report",
    "report_base",
    "report_object",
]

MAX_REPORT_BYTES = 64 * 1024  # the envelope, as stored by the collector
CLOCK_SKEW_S = 300  # how far a node's clock may run ahead of the reader's

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")


class InvalidReportError(ValueError):
    """A report that ``fleet`` lists apart; the message says why, in one line."""


def report_object(keyid: str) -> str:
    """The report's name under the report URL: ``nodes/<keyid>.json``."""
    return f"nodes/{keyid}.json"


def report_base(*, setting: str | None, announced: str | None, origin: str | None) -> str | None:
    """The report URL in force, ending in ``/``; None when the node does not report.

    ``setting`` is the node's ``report_url`` (``""`` turns reports off, whatever the snapshot
    says); else ``announced``, the snapshot's ``reports.url``, resolved against the origin.
    Only http and https can take a PUT; anything else means no reports.
    """
    if setting is not None:
        url = setting
    elif announced is not None:
        url = urljoin(origin or "", announced)
    else:
        return None
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        return None
    return url if url.endswith("/") else url + "/"


@dataclass(frozen=True)
class ReportView:
    """What ``fleet`` keeps of one valid report: small, so 100,000 of them fit in memory."""

    node: str  # key id
    public: bytes
    network: str
    at: int  # epoch seconds
    agent_version: str
    head: tuple[int, str] | None  # (serial, config digest)
    applied: tuple[int, str] | None
    converged: bool
    hold: bool
    quarantined: int  # how many digests
    waiting: int
    last_error: str | None


def check_report(data: bytes, *, name: str, now: float) -> ReportView:
    """Verify one stored report; ``name`` is its file name (``<keyid>.json``)."""
    if len(data) > MAX_REPORT_BYTES:
        raise InvalidReportError(f"over {MAX_REPORT_BYTES // 1024} KiB ({len(data)} bytes)")
    try:
        envelope = parse_envelope(data)
        payload = loads_strict(envelope.payload)
    except (EnvelopeError, JsonError) as exc:
        raise InvalidReportError(str(exc)) from None
    if envelope.payload_type != REPORT_TYPE:
        raise InvalidReportError(f"payloadType {envelope.payload_type[:80]!r} is not a report")
    if not isinstance(payload, dict):
        raise InvalidReportError("payload is not a JSON object")
    public_hex = _field(payload, "public", str)
    if _HEX64.match(public_hex) is None:
        raise InvalidReportError("`public` is not 64 lowercase hex digits")
    public = bytes.fromhex(public_hex)
    keyid = keyid_of(public)
    if name != f"{keyid}.json":
        raise InvalidReportError(f"file name is not the key id of `public` ({keyid[:16]}….json)")
    if _field(payload, "node", str) != keyid:
        raise InvalidReportError("`node` is not the key id of `public`")
    if keyid not in valid_keyids(envelope, {keyid: public}):
        raise InvalidReportError("signature does not verify with the key in `public`")
    return _view(payload, keyid=keyid, public=public, now=now)


def _view(payload: dict[str, Any], *, keyid: str, public: bytes, now: float) -> ReportView:
    at_text = _field(payload, "at", str)
    if _TIME.match(at_text) is None:
        raise InvalidReportError("`at` is not a time YYYY-MM-DDTHH:MM:SSZ")
    try:
        at = parse_time(at_text)
    except ValueError:
        raise InvalidReportError("`at` is not a real time") from None
    if at > now + CLOCK_SKEW_S:
        raise InvalidReportError(f"`at` {at_text} is in the future")
    error = payload.get("last_error")
    if error is not None and not isinstance(error, str):
        raise InvalidReportError("`last_error` is neither a string nor null")
    return ReportView(
        node=keyid,
        public=public,
        network=_field(payload, "network", str),
        at=at,
        agent_version=_field(payload, "agent_version", str)[:64],
        head=_snapshot_ref(payload, "head"),
        applied=_snapshot_ref(payload, "applied"),
        converged=_field(payload, "converged", bool),
        hold=_field(payload, "hold", bool),
        quarantined=len(_field(payload, "quarantined", list)),
        waiting=len(_field(payload, "waiting", list)),
        last_error=error[:500] if error else None,
    )


def _field(payload: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = payload.get(key)
    # bool is a subclass of int; no field here is an int, so isinstance is exact enough.
    if not isinstance(value, kind):
        raise InvalidReportError(f"`{key}` is missing or not a {kind.__name__}")
    return value


def _snapshot_ref(payload: dict[str, Any], key: str) -> tuple[int, str] | None:
    """``{serial, config_digest, …}`` or null; a null serial or digest counts as null."""
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidReportError(f"`{key}` is neither an object nor null")
    serial, digest = value.get("serial"), value.get("config_digest")
    if serial is None or digest is None:
        return None
    if not isinstance(serial, int) or isinstance(serial, bool) or not isinstance(digest, str):
        raise InvalidReportError(f"`{key}` has no integer serial and digest string")
    if _DIGEST.match(digest) is None:
        raise InvalidReportError(f"`{key}.config_digest` is not sha256:<64 hex>")
    return serial, digest
