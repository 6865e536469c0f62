"""The network's side: making roots, signing and publishing snapshots into an origin folder,
staged rollouts (``rollout``) and the fleet view over a folder of node reports (``fleet``,
``fleet_page``).
"""
