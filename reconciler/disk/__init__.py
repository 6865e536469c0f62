"""Files on the node's own disk: atomic replacement, the state lock, Ed25519 key files.

The lowest edge layer; it imports only the pure core.
"""
