"""Cluster-side resilience cores: load balancing, health checking, outlier detection.

Sans-IO: time and randomness are passed in, nothing here opens a socket except
``health_probes``, the I/O edge of active health checking.
"""
