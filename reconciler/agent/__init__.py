"""The agent: one pass (``once``), the loop (``watch``), operator control, ``init``."""
