"""Benchmarks of the reconciler, each measured against a baseline taken in the same run.

Not tests: pytest does not collect this folder and CI does not run it. ``python bench/run.py``
runs them all and writes ``bench/results.json``; see ``bench/README.md``.
"""
