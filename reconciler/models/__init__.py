"""The model store: content-addressed blobs, hard-linked trees, verified downloads.

Independent of ``history`` and ``runtime``.
"""
