"""The service registry: instances that join with heartbeats and become EDS endpoints."""
