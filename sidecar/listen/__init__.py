"""Where traffic enters the sidecar: listeners, protocol detection, downstream connections.

In: accepted sockets (on an inbound, outbound or intercepted port), and for intercepted ones
the original destination that iptables redirected. Out: an HTTP/2 or HTTP/1.1 connection
(``sidecar.http``) whose streams become exchanges (``sidecar.route``), or a TCP relay
(``sidecar.upstream.tcp``) for bytes the listener does not recognise.
"""
