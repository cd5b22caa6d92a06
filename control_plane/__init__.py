"""The Pilotfish xDS v3 control plane: serves the mesh file to proxies over ADS.

Layout, from the edges in:

* ``main`` — ``pilotfish control-plane`` / ``pilotfish validate``; wires the gRPC server.
* ``mesh`` — the mesh file schema and its validation (``docs/mesh-reference.md``).
* ``watcher`` — polls the file; good edits go to the cache, bad ones are logged and dropped.
* ``xds.resources`` — one proxy view of the mesh as Listener/Route/Cluster/Endpoint protos.
* ``xds.snapshot`` / ``xds.cache`` — consistent immutable snapshots, one per view.
* ``xds.stream_state`` — the sans-IO protocol of one ADS stream (nonces, ACK/NACK, hold-back).
* ``xds.server`` — the only module where that protocol meets gRPC.
* ``status_service`` / ``status_cli`` — ``pilotfish.status.v1`` and ``pilotfish status``.
"""
