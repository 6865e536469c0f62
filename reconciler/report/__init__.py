"""What the node tells its operator: status, log, verify, the Prometheus textfile."""
