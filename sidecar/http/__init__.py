"""HTTP connection adapters over the codecs, for either side of the proxy.

In: bytes from a socket. Out: the events of each stream, delivered to a ``StreamHandler``
(``sidecar.http.streams``), and a ``StreamSink`` the other side writes into. The adapters know
nothing of routes or clusters: the listener hands them a handler per stream downstream, and the
upstream pools open client streams on them.
"""
