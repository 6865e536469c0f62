"""Coverage-guided fuzzing (atheris) of the envelope and payload parsers; see harness.py."""
