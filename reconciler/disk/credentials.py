"""Credentials files: the bytes of a file that holds secrets, and the JSON object they are.

Edge module, below both readers of such files: ``models.mirror_auth`` (``mirror_auth_file``)
and ``runtime.registry_auth`` (``registry_auth_file``), which sit on the same layer and may not
share code through each other. Each pass that needs credentials reads its file here again, so
an edit takes effect at the next pass.

What it may not do: write or create anything; say what the entries of a file mean (the
callers do); put a byte of the file's contents in an error message.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from reconciler.core.errors import SettingsError
from reconciler.disk.strict import check_trusted

__all__ = ["credentials_json", "read_credentials"]


def read_credentials(path: Path, *, setting: str, limit: int, private: bool = False) -> bytes:
    """The bytes of ``path``, the file named by ``setting``: strict modes first, as for the
    settings file, and with ``private`` not readable by others either (as ssh's keys). A
    ``SettingsError`` starting with ``"<setting> <path>"`` when unusable or over ``limit``."""
    where = f"{setting} {path}"
    check_trusted(path, what=setting)
    if private:
        _refuse_if_others_read(path, where=where)
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise SettingsError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise SettingsError(f"{where} is larger than {limit} bytes")
    return raw


def credentials_json(raw: bytes, *, where: str) -> Any:
    """The JSON document of a credentials file's bytes; ``SettingsError`` (starting with
    ``where``) when they are not UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SettingsError(f"{where} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the text around it.
        raise SettingsError(f"{where} is not JSON: {exc.msg} at line {exc.lineno}") from None


def _refuse_if_others_read(path: Path, *, where: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # the read names what is wrong
    if mode & stat.S_IROTH:
        raise SettingsError(f"{where} is readable by others: make it 0600 or 0640")
