"""Pilotfish: a service mesh in Python (shared pieces: config model, command line)."""

__version__ = "0.1.0"
