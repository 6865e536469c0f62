"""The runtime edge: Podman (observe, pull, create, replace, health) and operator hooks.

The only package that talks to Podman or runs subprocesses; independent of ``history`` and
``models``. Callers use ``podman.PodmanEdge`` (with ``ActionOutcome``) and ``hooks.run_hook``;
the other modules are the edge's parts (``client``, ``observe``, ``pull``, ``registry_auth``,
``executor``, ``containers``, ``health``) and no podman-py or requests exception leaves them.
"""
