"""Clusters, their hosts and the connections to them.

In: a request for a cluster (from ``sidecar.route``) or a TCP relay target (from
``sidecar.listen``). The cluster's balancer picks a host among the healthy, non-ejected ones
(``sidecar.upstream.policy``), its pool hands out a connection with room for one more stream,
and the TCP relay moves raw bytes. Out: an upstream stream whose events flow back to the caller.
"""
