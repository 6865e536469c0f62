"""Intake: bytes from the origin (HTTP or ``file://``) to a verified commit in history."""
