"""Fixtures of the reliability tests: a Podman service and a registry of their own.

``private_podman`` yields a ``PrivatePodman`` already serving and a ``PrivateRegistry`` that
serves the session's test images on a port of its own; a test may stop and start either.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.services import PrivatePodman, PrivateRegistry
from tests.support.podman_fixtures import Registry


@pytest.fixture
def private_podman(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[tuple[PrivatePodman, PrivateRegistry]]:
    folder = tmp_path_factory.mktemp("pp")  # short: a socket path must fit in 108 bytes
    spare = PrivateRegistry(folder / "registry", serving=registry)
    podman = PrivatePodman(folder / "podman", registries=[registry.host, spare.host])
    podman.start()
    spare.start()
    try:
        yield podman, spare
    finally:
        spare.stop()
        podman.close()
