"""pytest fixtures for a real loopback HTTP server (see ``tests.support.fileserver``).

``file_server`` serves a fresh temporary folder; tests write files into ``file_server.root``
(or with ``file_server.write``), switch faults on with ``file_server.faults.set(...)`` and read
``file_server.stats``. The server is closed after the test even if a client is still stalled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fileserver import Fault, FileServer

__all__ = ["Fault", "FileServer", "file_server"]


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    with FileServer(tmp_path / "served") as server:
        yield server
