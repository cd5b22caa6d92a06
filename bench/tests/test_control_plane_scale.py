"""The pure parts of the control plane scale benchmark: the generated mesh, the views it
expects, the simulated sidecar's subscriptions, and the py-spy summary. No processes."""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from bench.ads_clients import SidecarSubscriptions, _node, _Parsed
from bench.control_plane_scale import (
    Scenario,
    generate_mesh,
    proxy_services,
    summarise_collapsed,
    visible_services,
    with_endpoints_moved,
)
from control_plane.mesh import parse_mesh, service_view
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


def _scenario(view: str) -> Scenario:
    return Scenario(services=40, proxies=8, view=view, open_fraction=0.2)


def test_generated_mesh_is_valid_and_views_match_the_control_plane() -> None:
    for view in ("depends_on", "all"):
        document = generate_mesh(_scenario(view))
        mesh = parse_mesh(document)
        for name in document["services"]:
            assert visible_services(document, name) == frozenset(service_view(mesh, name))
    limited = generate_mesh(_scenario("depends_on"))
    sizes = [len(visible_services(limited, s)) for s in proxy_services(limited, 8)]
    assert min(sizes) < 40


def test_moving_endpoints_changes_only_the_named_services() -> None:
    document = generate_mesh(_scenario("all"))
    moved = with_endpoints_moved(document, ["svc-0003"])
    changed = [n for n in document["services"]
               if document["services"][n] != moved["services"][n]]
    assert changed == ["svc-0003"]
    parse_mesh(moved)


def _respond(type_url: str, key: ViewKey, document: dict[str, Any], nonce: str,
             names: list[str] | None = None) -> discovery_pb2.DiscoveryResponse:
    view = build_view(parse_mesh(document), key)[type_url]
    wanted = sorted(view) if names is None else sorted(set(names) & set(view))
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url, version_info=f"v-{nonce}", nonce=nonce,
        resources=[view[n].packed for n in wanted],
    )


def test_sidecar_subscribes_to_what_its_listeners_and_clusters_name_and_acks() -> None:
    document = generate_mesh(_scenario("depends_on"))
    service = proxy_services(document, 8)[1]
    key = ViewKey(service=service)
    sidecar = SidecarSubscriptions(_node("p1", service), _Parsed())
    first = sidecar.initial_requests()
    assert [(r.type_url, list(r.resource_names)) for r in first] == [(LISTENER, []), (CLUSTER, [])]
    assert not sidecar.complete()

    sent = sidecar.on_response(_respond(LISTENER, key, document, "1"))
    ack, rds = sent
    assert (ack.type_url, ack.response_nonce, ack.version_info) == (LISTENER, "1", "v-1")
    assert rds.type_url == ROUTE and not rds.response_nonce
    sent = sidecar.on_response(_respond(CLUSTER, key, document, "2"))
    eds = sent[1]
    assert eds.type_url == ENDPOINT
    assert not sidecar.complete()
    sidecar.on_response(_respond(ROUTE, key, document, "3", list(rds.resource_names)))
    [eds_ack] = sidecar.on_response(
        _respond(ENDPOINT, key, document, "4", list(eds.resource_names))
    )
    assert eds_ack.response_nonce == "4" and list(eds_ack.resource_names) == list(
        eds.resource_names
    )
    assert sidecar.complete()
    assert set(eds.resource_names) == visible_services(document, service)


def test_py_spy_summary_ranks_self_time_by_frame_and_module() -> None:
    raw = "\n".join([
        "main (app.py:1);work (lib/a.py:10) 30",
        "main (app.py:1);work (lib/a.py:10);leaf (lib/b.py:5) 60",
        "main (app.py:1);other (lib/a.py:20) 10",
    ])
    summary = summarise_collapsed(raw)
    assert summary.startswith("100 samples")
    frames = summary.split("self time by module:")[0]
    assert frames.index("leaf (lib/b.py:5)") < frames.index("work (lib/a.py:10)")
    assert "60.0%  lib/b.py" in summary and "40.0%  lib/a.py" in summary
