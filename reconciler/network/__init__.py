"""The network's side: making roots, signing and publishing snapshots into an origin folder."""
