"""The model store: content-addressed blobs, hard-linked trees, verified downloads.

Callers outside this package use ``store.ModelStore`` (and ``download.new_client``,
``progress.ProgressReporter``); the other modules are the store's parts, described in
``store``'s docstring. Independent of ``history`` and ``runtime``.
"""
