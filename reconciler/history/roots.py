"""The node's chain of trusted roots, ``<state>/roots/<N>.json`` (envelope bytes as served).

Edge module (files). Root 1 (or whichever the operator installed) is trusted by fiat; each
later file is re-checked against its predecessor whenever the chain is loaded, so a root
file edited on disk is noticed. Commits are re-verified against the root version their
``Root-Version`` trailer names, so every root ever accepted is kept. Strict modes: each root
file is checked (``disk.strict``) before it is read, so a root that another user could have
written is refused (``UntrustedPathError``, exit 2) rather than trusted.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.core.errors import HistoryError, RejectedError
from reconciler.core.trust import VerifiedRoot, verify_initial_root, verify_next_root
from reconciler.disk.atomic import write_atomic
from reconciler.disk.strict import check_trusted

__all__ = ["RootChain"]


class RootChain:
    def __init__(self, folder: Path, *, network: str) -> None:
        self.folder = folder
        self.network = network
        self._chain: dict[int, VerifiedRoot] | None = None

    def install(self, envelope: bytes) -> VerifiedRoot:
        """Install the operator's trusted root (``reconcile init``)."""
        verified = verify_initial_root(envelope, network=self.network)
        write_atomic(self.folder / f"{verified.root.version}.json", envelope)
        self._chain = None
        return verified

    def _load(self) -> dict[int, VerifiedRoot]:
        if self._chain is not None:
            return self._chain
        versions = sorted(int(p.stem) for p in self.folder.glob("*.json") if p.stem.isdigit())
        if not versions:
            raise HistoryError(f"no trusted root in {self.folder} (run `reconcile init`)")
        chain: dict[int, VerifiedRoot] = {}
        try:
            first = verify_initial_root(self._read(versions[0]), network=self.network)
            chain[first.root.version] = first
            previous = first
            for version in versions[1:]:
                if version != previous.root.version + 1:
                    raise HistoryError(
                        f"trusted roots jump from {previous.root.version} to {version}"
                    )
                data = self._read(version)
                previous = verify_next_root(previous.root, data, network=self.network)
                chain[version] = previous
        except RejectedError as exc:
            raise HistoryError(f"stored trusted root is invalid: {exc}") from exc
        self._chain = chain
        return chain

    def _read(self, version: int) -> bytes:
        path = self.folder / f"{version}.json"
        check_trusted(path, what="trusted root")
        return path.read_bytes()

    def newest(self) -> VerifiedRoot:
        chain = self._load()
        return chain[max(chain)]

    def version(self, number: int) -> VerifiedRoot:
        chain = self._load()
        if number not in chain:
            raise HistoryError(f"root version {number} is not in the trusted chain")
        return chain[number]

    def accept(self, verified: VerifiedRoot) -> None:
        write_atomic(self.folder / f"{verified.root.version}.json", verified.envelope)
        self._load()[verified.root.version] = verified
