"""``Sidecar.apply``: a config is put in force whole, or not at all."""

from __future__ import annotations

import asyncio

import pytest

from pilotfish.config.bootstrap import parse_bootstrap
from sidecar.server import ApplyError, Sidecar
from tests.support import simple_config


def test_an_access_log_that_cannot_open_rejects_the_whole_config(tmp_path: object) -> None:
    """The control plane may push a file access log the sidecar cannot write. The update must
    be refused (NACKed) as a whole: before, clusters and routes were swapped, then the open
    failed with an OSError that the xDS client took for a broken stream, and the old access
    log had been closed already."""

    async def run() -> None:
        first = parse_bootstrap(simple_config(["127.0.0.1:1"]))
        sidecar = Sidecar(first)
        sidecar.apply(first)
        config = simple_config(["127.0.0.1:2"])
        config["access_log"] = {"sink": "file", "path": "/nonexistent/dir/access.log"}
        second = parse_bootstrap(config)
        with pytest.raises(ApplyError, match="access log"):
            sidecar.apply(second)
        assert sidecar.bootstrap is first
        cluster = sidecar.clusters.get("app")
        assert cluster is not None and cluster.config == first.clusters["app"]
        assert sidecar.access.enabled  # the old log still writes

    asyncio.run(run())
