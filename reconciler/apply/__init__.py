"""The apply transaction: converge the node to HEAD in a fixed order, with its failure policy.

Read in the order of docs/apply-order.md: ``transaction`` (``converge``, ``rollback_to``: the
order itself) → ``recovery`` (step 0) → ``target`` (1) → ``nodeplan`` (2) → ``steps`` (3 to 8)
→ ``policy`` (what a failure means) and ``receipt`` (what an attempt signs). ``edges`` is
what the transaction needs from the world (protocols, and the production wiring), ``attempt``
the log one attempt keeps for its receipt, ``crash`` the crash-test seam.
"""
