"""Kubernetes: discover Services and their pods (EndpointSlices), inject sidecars."""
