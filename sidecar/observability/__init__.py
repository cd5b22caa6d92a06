"""Observability for the sidecar: tracing (OpenTelemetry), Prometheus metrics, access logs.

Each module has a narrow API the request path calls; none of them does I/O on the event loop
beyond a short write (access logs) or an append to a bounded queue (spans).
"""
