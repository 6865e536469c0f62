"""Strict modes: a file the root agent trusts must not be writable by anyone but root or itself.

Edge module (``lstat`` only; reads no file's bytes). Called before the agent runs a hook or
reads the settings file, a trusted root, the registry credentials or the entries of its state
folder (docs/security.md, "A local attacker"). ``check_trusted`` walks the path from ``/``
one entry at a time, as the kernel resolves it, and requires of every entry it meets:

* its owner is root or the agent's own user (for a symlink too: in a sticky folder such as
  ``/tmp`` the owner of an entry may replace it);
* it is not writable by group or others, unless it is a folder owned by root with the sticky
  bit (``/tmp``), where nobody may rename or remove what another user owns.

A symlink is followed and everything its target's path traverses is checked in the same way,
so a link to a file that others can write is refused like the file itself. With a trusted
group (the ``strict_modes_group`` setting) an entry of that group may be group-writable and
may be owned by one of the group's members; others-writable stays refused.

What it may not do: open, change or create anything; decide what a refusal means (a veto for
a hook, exit 2 for a settings file): callers do, with the one line of ``UntrustedPathError``.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.errors import SettingsError, UntrustedPathError

__all__ = ["TrustedGroup", "check_trusted", "check_trusted_entries", "trusted_group"]

_MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one resolution
_ANY_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class TrustedGroup:
    """A group whose members may manage a trusted file (``strict_modes_group``)."""

    name: str
    gid: int
    members: frozenset[int]  # uids whose primary or supplementary group this is


def trusted_group(name: str, *, setting: str = "strict_modes_group") -> TrustedGroup:
    """The group named ``name`` on this machine; ``SettingsError`` (naming ``setting``) if
    there is none."""
    try:
        entry = grp.getgrnam(name)
    except KeyError:
        raise SettingsError(f"{setting} {name!r} is not a group on this machine") from None
    members = {user.pw_uid for user in pwd.getpwall() if user.pw_gid == entry.gr_gid}
    for member in entry.gr_mem:
        try:
            members.add(pwd.getpwnam(member).pw_uid)
        except KeyError:
            continue  # a stale member name owns no file
    return TrustedGroup(name=name, gid=entry.gr_gid, members=frozenset(members))


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _problem(st: os.stat_result, *, euid: int, group: TrustedGroup | None) -> str | None:
    """Why an entry cannot be trusted, or None."""
    mode = st.st_mode
    if not mode & _ANY_WRITE and st.st_uid in (0, euid):
        return None  # the common case, decided at once: every pass checks a few dozen entries
    owner_ok = st.st_uid in (0, euid) or (
        group is not None and st.st_gid == group.gid and st.st_uid in group.members
    )
    if not owner_ok:
        return f"owned by {_user(st.st_uid)}"
    if stat.S_ISLNK(mode):
        return None  # a symlink's own mode means nothing; its folder and target are checked
    if stat.S_ISDIR(mode) and mode & stat.S_ISVTX and st.st_uid == 0:
        return None  # like /tmp: others may add entries, never replace one they do not own
    group_write = bool(mode & stat.S_IWGRP)
    if group_write and group is not None and st.st_gid == group.gid:
        group_write = False
    others_write = bool(mode & stat.S_IWOTH)
    if group_write and others_write:
        return "writable by group and others"
    if group_write:
        return "writable by group"
    if others_write:
        return "writable by others"
    return None


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(st.st_mode) else "file"


@dataclass(frozen=True)
class _Refusal:
    entry: str
    kind: str  # folder, file, symlink
    reason: str


def _walk(start: str, *, group: TrustedGroup | None) -> _Refusal | bool:
    """Resolve ``start`` (absolute, normalised) entry by entry, as the kernel does, checking
    each one: the first refusal, else whether the path exists. Raises ``OSError`` when it
    cannot look. Plain strings, not ``Path``: this runs on every pass."""
    euid = os.geteuid()
    problem = _problem(os.lstat("/"), euid=euid, group=group)
    if problem:
        return _Refusal("/", "folder", problem)
    pending = start.split("/")[::-1]
    current = ""  # "" is the root: entries are current + "/" + name
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.rpartition("/")[0]  # always resolved: its parent is real
            continue
        entry = current + "/" + name
        try:
            st = os.lstat(entry)
        except (FileNotFoundError, NotADirectoryError):
            return False
        problem = _problem(st, euid=euid, group=group)
        if problem:
            return _Refusal(entry, _kind(st), problem)
        if not stat.S_ISLNK(st.st_mode):
            current = entry
            continue
        links += 1
        if links > _MAX_LINKS:
            return _Refusal(entry, "symlink", "in a loop of symlinks")
        target = os.readlink(entry)
        if target.startswith("/"):
            current = ""
        pending.extend(target.split("/")[::-1])
    return True


def check_trusted(path: Path, *, what: str, group: str | None = None) -> bool:
    """Check ``path`` and everything its resolution traverses; whether it exists.

    Raises ``UntrustedPathError`` (one line: ``what``, the path and the reason, e.g.
    ``hooks folder /etc/reconciler/hooks is writable by group``) for the first entry that
    fails. A path that does not exist is not an error: the entries that do exist on the way
    are checked, and the answer is False. ``group`` names the trusted group
    (``strict_modes_group``), if any; an unknown group is a ``SettingsError``.
    """
    start = os.path.abspath(path)
    try:
        verdict = _walk(start, group=trusted_group(group) if group is not None else None)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UntrustedPathError(f"{what} {start} cannot be checked: {reason}") from None
    if not isinstance(verdict, _Refusal):
        return verdict
    if verdict.entry == start:
        raise UntrustedPathError(f"{what} {start} is {verdict.reason}")
    raise UntrustedPathError(f"{what} {start}: {verdict.kind} {verdict.entry} is {verdict.reason}")


def check_trusted_entries(
    folder: Path, entries: Iterable[tuple[str, str]], *, what: str, group: str | None = None
) -> bool:
    """``check_trusted(folder)``, then each ``(name, what)`` of ``entries`` inside it that
    exists, with one ``lstat`` each: the folders above are the checked folder's (a symlink
    among the entries is checked in full, its target being elsewhere). Whether the folder
    exists; raises ``UntrustedPathError`` like ``check_trusted``."""
    if not check_trusted(folder, what=what, group=group):
        return False
    found = trusted_group(group) if group is not None else None
    euid = os.geteuid()
    base = os.path.abspath(folder)
    for name, entry_what in entries:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UntrustedPathError(f"{entry_what} {path} cannot be checked: {reason}") from None
        if stat.S_ISLNK(st.st_mode):
            check_trusted(Path(path), what=entry_what, group=group)
            continue
        problem = _problem(st, euid=euid, group=found)
        if problem:
            raise UntrustedPathError(f"{entry_what} {path} is {problem}")
    return True
