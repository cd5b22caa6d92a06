"""``pilotfish proxy-config``'s tables, from a sidecar's /config_dump and /clusters."""

from __future__ import annotations

import yaml

from control_plane.proxy_config_cli import format_proxy_config, parse_clusters
from pilotfish.config.bootstrap import parse_bootstrap
from sidecar.admin import _jsonable

BOOTSTRAP = """\
listeners:
  - {name: ingress, address: 127.0.0.1:8080, route_config: local}
  - {name: raw, address: 127.0.0.1:8081, mode: tcp, tcp_passthrough: {cluster: db}}
route_configs:
  - name: local
    virtual_hosts:
      - name: api
        domains: [api, "api:*"]
        routes:
          - match: {prefix: /v1, headers: [{name: x-canary, exact: "1"}]}
            route: {weighted_clusters: {api: 90, api-canary: 10}, timeout: 250ms}
clusters:
  - {name: api, endpoints: [127.0.0.1:9001, {address: 127.0.0.1:9002, weight: 3}]}
  - {name: api-canary, endpoints: [127.0.0.1:9003], load_balancing: {policy: least_request}}
  - {name: db, protocol: tcp, endpoints: [127.0.0.1:5432]}
"""

CLUSTERS = """\
api::127.0.0.1:9001::rq_active::2
api::127.0.0.1:9001::health_flags::healthy
api::127.0.0.1:9002::rq_active::0
api::127.0.0.1:9002::health_flags::/failed_outlier_check
api-canary::127.0.0.1:9003::rq_active::1
api-canary::127.0.0.1:9003::health_flags::healthy
"""


def test_the_tables() -> None:
    dump = {"bootstrap": _jsonable(parse_bootstrap(yaml.safe_load(BOOTSTRAP)))}
    text = format_proxy_config("api-1", "127.0.0.1:15000", dump, parse_clusters(CLUSTERS))
    assert text == """\
proxy api-1 (admin http://127.0.0.1:15000)

LISTENERS
NAME     ADDRESS         DESTINATION
ingress  127.0.0.1:8080  route config local
raw      127.0.0.1:8081  tcp to cluster db

ROUTES
ROUTE CONFIG  VIRTUAL HOST  DOMAINS    MATCH                        CLUSTERS               TIMEOUT
local         api           api,api:*  prefix /v1; header x-canary  api 90, api-canary 10  250ms

CLUSTERS
NAME        PROTOCOL  LOAD BALANCING        ENDPOINTS  HEALTHY
api         http2     weighted_round_robin  2          1
api-canary  http2     least_request         1          1
db          tcp       weighted_round_robin  1          0

ENDPOINTS
CLUSTER     ADDRESS         WEIGHT  HEALTH                 ACTIVE REQUESTS
api         127.0.0.1:9001  1       healthy                2
api         127.0.0.1:9002  3       /failed_outlier_check  0
api-canary  127.0.0.1:9003  1       healthy                1
db          127.0.0.1:5432  1       unknown                -
"""
