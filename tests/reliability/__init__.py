"""Reliability campaign (issue 8): attack corpus, crash campaign, faults, properties, soak.

The quick versions run in the default ``pytest`` run; ``campaign`` and ``soak`` also run on
their own (``python -m tests.reliability.campaign --kills 500``). docs/reliability.md has the
figures, docs/security.md the attack corpus.
"""
