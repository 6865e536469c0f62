"""Shared fixtures. Each support module registers its own fixtures as a pytest plugin."""

pytest_plugins = [
    "tests.support.origin_fixtures",
    "tests.support.podman_fixtures",
    "tests.support.http_fixtures",
]
