"""The pure core: bytes and values in, values out.

No I/O, no clock read, no Podman, git or HTTP: documents and their schemas, DSSE envelopes,
the trust checks, the container specs a snapshot asks for, the container plan, what the
runtime is told, and the node record with its named transitions. Everything above calls
into it; it imports nothing of the package outside itself (``.importlinter``).
"""
