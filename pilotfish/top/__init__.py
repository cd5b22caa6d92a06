"""``pilotfish top``: success rate, requests/s and p50/p99 per service and route, live.

``core`` is pure (scrape text in, rows out, no sockets or clocks of its own); ``view`` formats
rows as a table or JSON; ``run`` finds the sidecars, scrapes them and redraws.
"""
