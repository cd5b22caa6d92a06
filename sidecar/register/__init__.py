"""Registering the app a sidecar fronts: health gating, heartbeats, and leaving gracefully."""
