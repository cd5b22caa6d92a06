"""Workload identity on the sidecar: its key and certificate, TLS contexts, peer verification."""
