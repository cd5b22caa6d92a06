"""The control plane's Prometheus metrics, scraped over HTTP while a real ADS stream runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from control_plane.main import start_control_plane
from control_plane.xds.types import ENDPOINT
from tests.control_plane.helpers import MESH_YAML, sotw
from tests.control_plane.test_server import Client, _with_node, edit, run
from tests.support import free_port, http_get


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_connections_pushes_latency_and_nacks_are_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "mesh.yaml"
        path.write_text(MESH_YAML)
        port = free_port()
        plane = await start_control_plane(
            path, "127.0.0.1", 0, poll_interval=0.05, metrics_address=("127.0.0.1", port)
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                client = Client(stub.StreamAggregatedResources())
                await client.send(_with_node(sotw(ENDPOINT, ["quotes"]), service="greeter"))
                eds = await client.next()
                await client.send(sotw(ENDPOINT, ["quotes"], eds.version_info, eds.nonce))
                before = await asyncio.to_thread(scrape, port)
                assert before[("pilotfish_xds_connected_proxies", (("stream", "sotw"),))] == 1
                assert before[("pilotfish_xds_pushes_total", (("type", "EDS"),))] == 1
                assert before[("pilotfish_mesh_generation", ())] == 1

                edit(tmp_path, MESH_YAML.replace("50071", "50072"))
                pushed = await client.next()
                await client.send(
                    sotw(ENDPOINT, ["quotes"], eds.version_info, pushed.nonce, error="no")
                )
                await asyncio.sleep(0.2)
                after = await asyncio.to_thread(scrape, port)
                assert after[("pilotfish_xds_pushes_total", (("type", "EDS"),))] == 2
                assert after[("pilotfish_xds_nacks_total", (("type", "EDS"),))] == 1
                assert after[("pilotfish_xds_push_latency_seconds_count", ())] == 1
                assert after[("pilotfish_mesh_generation", ())] == 2

                edit(tmp_path, "services: {bad: {endpoints: [nowhere]}}\n")
                await asyncio.sleep(0.3)
                rejected = await asyncio.to_thread(scrape, port)
                assert rejected[("pilotfish_mesh_reload_errors_total", ())] == 1
                client.call.cancel()
            await asyncio.sleep(0.2)
            closed = await asyncio.to_thread(scrape, port)
            assert closed[("pilotfish_xds_connected_proxies", (("stream", "sotw"),))] == 0
        finally:
            await plane.stop(grace=None)

    run(scenario)
