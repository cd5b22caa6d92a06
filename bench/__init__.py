"""Pilotfish's benchmark harness: ``python -m bench`` measures the proxy against a direct path
and nghttpx, and regenerates ``docs/benchmarks.md``."""
