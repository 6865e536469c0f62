"""The runtime edge: Podman (observe, pull, create, replace, health) and operator hooks.

The only package that talks to Podman or runs subprocesses; independent of ``history`` and
``models``.
"""
