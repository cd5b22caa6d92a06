"""Admin endpoints that need no sockets."""

from __future__ import annotations

import asyncio

import pytest

from pilotfish.plainhttp import is_loopback
from sidecar.admin import AdminServer
from sidecar.server import Sidecar
from tests.support import simple_config
from tests.unit.sidecar_fakes import listener_for


def test_prometheus_keeps_dotted_stat_names_out_of_the_label() -> None:
    """``cluster.app.outlier_detection.ejections_active`` is stat
    ``outlier_detection.ejections_active`` of cluster ``app``, not a stat of a cluster
    called ``app.outlier_detection``."""

    async def make() -> Sidecar:
        sidecar = listener_for(simple_config(["127.0.0.1:1"])).sidecar
        assert isinstance(sidecar, Sidecar)
        return sidecar

    sidecar = asyncio.run(make())
    scope = sidecar.stats.scope("cluster.app")
    scope.inc("upstream_rq_total", 3)
    scope.inc("health_check.failure", 2)
    scope.gauges["outlier_detection.ejections_active"] = 1
    status, _, body = AdminServer(sidecar).prometheus()
    lines = body.decode().splitlines()
    assert status == 200
    assert 'pilotfish_cluster_upstream_rq_total{cluster="app"} 3' in lines
    assert 'pilotfish_cluster_health_check_failure{cluster="app"} 2' in lines
    assert 'pilotfish_cluster_outlier_detection_ejections_active{cluster="app"} 1' in lines
    assert "# TYPE pilotfish_cluster_outlier_detection_ejections_active gauge" in lines


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 5000), True),
        (("127.9.9.9", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        (("10.0.0.7", 5000), False),
        (("::ffff:10.0.0.7", 5000, 0, 0), False),
        (("fe80::1%eth0", 5000, 0, 2), False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_peers(peer: object, loopback: bool) -> None:
    assert is_loopback(peer) is loopback
