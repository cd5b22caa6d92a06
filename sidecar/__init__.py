"""The Pilotfish sidecar proxy."""
