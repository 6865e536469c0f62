"""The agent: one pass (``once``), the loop (``watch``) and its report ``heartbeat``, operator
control (rollback, resume), ``init``.
"""
