"""The sidecar's xDS client: an ADS stream to the control plane, translated into config.

In: Listener, RouteConfiguration, Cluster and ClusterLoadAssignment resources over ADS. Out:
the sidecar's config model (``pilotfish.config``), applied to the running sidecar whole, or the
resource NACKed with a message naming the field while the last good config stays in force.
"""
