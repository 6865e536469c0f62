"""What the node tells its operator and the network: status, log, verify, the Prometheus
textfile, and the signed node report it PUTs to a collector (``node_report``, ``sender``,
``deliveries``).
"""
