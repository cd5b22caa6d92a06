"""The request's decisions: route match, then the exchange that carries one request through.

In: a downstream stream's headers (``sidecar.http.streams``). The route table picks a route and
its cluster; the exchange applies the route's policies (deadline, retry, fault, rate limit,
fallback, shedding; ``sidecar.route.policy``) and relays the request to a host that
``sidecar.upstream`` picks. Out: the upstream response relayed back, or a local reply with a
response flag.
"""
