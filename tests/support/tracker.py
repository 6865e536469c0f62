"""A real BitTorrent tracker for the swarm discovery tests: Debian's ``opentracker``.

Where it sits: test support only. ``.ci/setup`` installs the package; a test starts one
tracker on 127.0.0.1 on a free port (TCP and UDP), in a folder of its own, and stops it when
it is done. Debian builds opentracker in whitelist mode: it tracks only the info-hashes
listed in its whitelist file, which is how a network operator runs it too (the network's
torrents and nothing else), so the test lists the torrents it publishes.

What it may not do: touch anything outside its folder; outlive the test (``close`` stops
the process it started, by its own handle).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from tests.support.podman_fixtures import free_port

__all__ = ["Tracker", "opentracker_installed"]

_START_S = 10.0


def opentracker_installed() -> bool:
    return shutil.which("opentracker") is not None


class Tracker:
    """``opentracker`` on 127.0.0.1:``port`` tracking exactly ``info_hashes`` (hex v1)."""

    def __init__(self, folder: Path, info_hashes: Iterable[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        (folder / "whitelist.txt").write_text("".join(f"{h}\n" for h in info_hashes))
        self._log = (folder / "opentracker.log").open("wb")
        # -d: it chroots there when run as root (and only changes directory otherwise), so the
        # whitelist is named relative to it; -u: the user it drops to when run as root.
        self._process = subprocess.Popen(
            [
                "opentracker",
                "-i",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-P",
                str(self.port),
                "-d",
                str(folder),
                "-w",
                "whitelist.txt",
                "-u",
                "nobody",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()

    @property
    def announce_url(self) -> str:
        # libtorrent refuses a tracker on the loopback address unless its path is /announce
        # (its SSRF mitigation), which is opentracker's path anyway.
        return f"http://127.0.0.1:{self.port}/announce"

    @property
    def udp_announce_url(self) -> str:
        return f"udp://127.0.0.1:{self.port}/announce"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + _START_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"opentracker exited: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"opentracker did not listen on {self.port}: {self.output()}")

    def seeders(self, info_hash: str) -> int:
        """How many peers the tracker knows that hold the whole torrent (its scrape)."""
        quoted = urllib.parse.quote_from_bytes(bytes.fromhex(info_hash))
        url = f"http://127.0.0.1:{self.port}/scrape?info_hash={quoted}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            body: bytes = answer.read()
        # "d5:filesd20:<hash>d8:completeiNe..."; one torrent asked, so one "complete".
        marker = b"8:completei"
        at = body.find(marker)
        if at < 0:
            return 0
        return int(body[at + len(marker) : body.index(b"e", at + len(marker))])

    def output(self) -> str:
        self._log.flush()
        return (self.folder / "opentracker.log").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
