"""The node's memory: the git repository of verified snapshots, the trusted roots, the node
record file and the signed receipt notes, opened together as one ``Node``.

Independent of ``models`` and ``runtime``; used by intake, apply, report and the agent.
"""
