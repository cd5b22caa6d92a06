"""The registry core (leases, eviction, tombstones) on a fake clock, and how registered
instances become EDS endpoints of the services whose mesh entry asks for them."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.mesh import RegistrySelector, parse_mesh_text
from control_plane.registry.core import (
    Deregistered,
    InstanceState,
    InvalidInstance,
    Registry,
    UnknownInstance,
    make_instance,
)
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import ViewKey
from control_plane.xds.stream_state import SotwStream
from control_plane.xds.types import ENDPOINT
from pilotfish.config.errors import ConfigError
from tests.control_plane.helpers import sotw


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock, interval: float = 1.0) -> Registry:
    return Registry(clock, heartbeat_interval=interval)


def test_a_lease_lasts_three_missed_heartbeats() -> None:
    clock = Clock()
    reg = registry(clock)
    inst = reg.register(make_instance("echo", "127.0.0.1", 9000))
    assert reg.ttl == 3.0 and inst.id == "echo/127.0.0.1:9000"
    clock.now += 2.9
    assert reg.expire() == []
    reg.heartbeat(inst.id)  # renews: three more intervals from now
    clock.now += 2.9
    assert reg.expire() == []
    assert reg.next_expiry() == pytest.approx(clock.now + 0.1)
    clock.now += 0.1
    assert [i.id for i in reg.expire()] == [inst.id]
    assert reg.instances() == []
    with pytest.raises(UnknownInstance):
        reg.heartbeat(inst.id)  # evicted: the instance must register again


def test_deregistered_instances_are_not_revived_by_a_heartbeat() -> None:
    clock = Clock()
    reg = registry(clock)
    inst = reg.register(make_instance("echo", "127.0.0.1", 9000))
    assert reg.deregister(inst.id) == inst
    assert reg.deregister(inst.id) is None
    with pytest.raises(Deregistered):
        reg.heartbeat(inst.id)
    reg.register(inst)  # an explicit registration brings it back
    assert reg.heartbeat(inst.id) == inst


def test_tombstones_are_forgotten_after_ten_leases() -> None:
    clock = Clock()
    reg = registry(clock)
    inst = reg.register(make_instance("echo", "127.0.0.1", 9000))
    reg.deregister(inst.id)
    clock.now += 29.9
    reg.expire()
    with pytest.raises(Deregistered):
        reg.heartbeat(inst.id)
    clock.now += 0.1
    reg.expire()
    with pytest.raises(UnknownInstance):
        reg.heartbeat(inst.id)
    assert reg.next_expiry() is None


def test_changes_are_reported_by_service_and_counted() -> None:
    clock = Clock()
    reg = registry(clock)
    seen: list[frozenset[str]] = []
    reg.on_change(seen.append)
    a = reg.register(make_instance("echo", "127.0.0.1", 1))
    reg.register(make_instance("echo", "127.0.0.1", 1))  # the same again: no change
    reg.heartbeat(a.id)  # a plain renewal changes nothing a proxy sees
    reg.heartbeat(a.id, InstanceState.DRAINING)
    reg.register(make_instance("quotes", "127.0.0.2", 2))
    reg.deregister(a.id)
    assert seen == [frozenset({"echo"}), frozenset({"echo"}), frozenset({"quotes"}),
                    frozenset({"echo"})]
    assert reg.revision == 4


def test_held_instances_never_expire_here_and_leave_without_a_tombstone() -> None:
    """How a control plane mirrors instances whose leases live in etcd."""
    clock = Clock()
    reg = registry(clock)
    inst = make_instance("echo", "127.0.0.1", 9000)
    reg.hold(inst)
    reg.hold(inst)  # the same again: no change
    assert reg.revision == 1 and reg.next_expiry() is None
    clock.now += 1000
    assert reg.expire() == []
    assert reg.drop(inst.id) == inst and reg.drop(inst.id) is None
    with pytest.raises(UnknownInstance):
        reg.heartbeat(inst.id)
    assert reg.revision == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"service": "Echo"}, "service"),
        ({"host": "localhost"}, "address"),
        ({"port": 0}, "port"),
        ({"weight": 129}, "weight"),
        ({"labels": {"version": "v 2"}}, "labels.version"),
        ({"labels": {"-bad": "x"}}, "labels.-bad"),
    ],
)
def test_bad_registrations_name_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"service": "echo", "host": "127.0.0.1", "port": 9000}
    args.update(kwargs)
    with pytest.raises(InvalidInstance) as info:
        make_instance(**args)  # type: ignore[arg-type]
    assert info.value.field == field


MESH = """
services:
  caller:
    endpoints: [127.0.0.1:7000]
    depends_on: [echo, echo-v2, both]
  echo:
    discovery: registry
  echo-v2:
    discovery: registry
    registry: {service: echo, labels: {version: v2}}
  both:
    discovery: mixed
    endpoints: [127.0.0.1:8000]
    registry: {service: echo}
  loner:
    endpoints: [127.0.0.1:9999]
    depends_on: []
"""


def endpoints_of(cache: SnapshotCache, name: str, key: ViewKey | None = None) -> list[
    tuple[str, int, int, int, dict[str, str]]
]:
    cla = endpoint_pb2.ClusterLoadAssignment()
    cache.snapshot(key or ViewKey()).of_type(ENDPOINT)[name].packed.Unpack(cla)
    return [
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value,
         lb.load_balancing_weight.value, lb.health_status,
         dict(lb.metadata.filter_metadata["envoy.lb"]))
        for locality in cla.endpoints for lb in locality.lb_endpoints
    ]


HEALTHY, DRAINING = health_check_pb2.HEALTHY, health_check_pb2.DRAINING


def localities(cache: SnapshotCache, name: str) -> list[tuple[str, list[int]]]:
    """Each locality once (gRPC rejects a locality named twice), with its endpoints' ports."""
    cla = endpoint_pb2.ClusterLoadAssignment()
    cache.snapshot(ViewKey()).of_type(ENDPOINT)[name].packed.Unpack(cla)
    return [
        (loc.locality.zone, [lb.endpoint.address.socket_address.port_value
                             for lb in loc.lb_endpoints])
        for loc in cla.endpoints
    ]


def test_registered_instances_become_endpoints_of_the_services_that_ask() -> None:
    clock = Clock()
    reg = registry(clock)
    cache = SnapshotCache(parse_mesh_text(MESH), reg)
    assert endpoints_of(cache, "echo") == []
    assert endpoints_of(cache, "both") == [("127.0.0.1", 8000, 1, HEALTHY, {})]
    revision = cache.revision
    v1 = reg.register(make_instance("echo", "127.0.0.1", 9001, labels={"version": "v1"}))
    reg.register(make_instance("echo", "127.0.0.1", 9002, weight=5, labels={"version": "v2"}))
    assert cache.revision == revision + 2
    assert cache.generation == 1  # the mesh did not change
    assert endpoints_of(cache, "echo") == [
        ("127.0.0.1", 9001, 1, HEALTHY, {"version": "v1"}),
        ("127.0.0.1", 9002, 5, HEALTHY, {"version": "v2"}),
    ]
    assert [e[1] for e in endpoints_of(cache, "echo-v2")] == [9002]
    assert [e[1] for e in endpoints_of(cache, "both")] == [8000, 9001, 9002]
    reg.register(make_instance("echo", "127.0.0.1", 9003, zone="z2"))
    assert localities(cache, "both") == [("local", [8000, 9001, 9002]), ("z2", [9003])]
    assert localities(cache, "echo") == [("local", [9001, 9002]), ("z2", [9003])]
    reg.deregister("echo/127.0.0.1:9003")
    # The caller's own view gets the same; a view without echo is left alone.
    assert [e[1] for e in endpoints_of(cache, "echo", ViewKey(service="caller"))] == [9001, 9002]
    assert "echo" not in cache.snapshot(ViewKey(service="loner")).of_type(ENDPOINT)
    reg.heartbeat(v1.id, InstanceState.DRAINING)
    assert endpoints_of(cache, "echo")[0][3] == DRAINING
    reg.deregister(v1.id)
    assert [e[1] for e in endpoints_of(cache, "echo")] == [9002]


def test_a_mesh_edit_keeps_the_registered_endpoints() -> None:
    clock = Clock()
    reg = registry(clock)
    cache = SnapshotCache(parse_mesh_text(MESH), reg)
    reg.register(make_instance("echo", "127.0.0.1", 9001))
    cache.set_mesh(parse_mesh_text(MESH.replace("caller:", "caller2:")))
    assert [e[1] for e in endpoints_of(cache, "echo")] == [9001]


def test_a_registry_change_is_pushed_to_subscribed_streams() -> None:
    clock = Clock()
    reg = registry(clock)
    cache = SnapshotCache(parse_mesh_text(MESH), reg)
    pushes: list[int] = []
    cache.on_change(lambda: pushes.append(cache.revision))
    stream = SotwStream()
    responses, _ = stream.handle_request(sotw(ENDPOINT, ["echo"]), cache.snapshot(ViewKey()))
    assert len(responses) == 1 and stream.subscribed(ENDPOINT, "echo")
    assert not stream.subscribed(ENDPOINT, "both")
    reg.register(make_instance("echo", "127.0.0.1", 9001))
    assert pushes == [cache.revision]
    [push] = stream.handle_snapshot(cache.snapshot(ViewKey()))
    assert push.version_info != responses[0].version_info


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: {a: {discovery: dns}}",
         "services.a.discovery: expected one of: static, registry, mixed"),
        ("services: {a: {discovery: registry, endpoints: [127.0.0.1:1]}}",
         "services.a.endpoints: not with discovery: registry (use discovery: mixed for both)"),
        ("services: {a: {endpoints: [127.0.0.1:1], registry: {service: a}}}",
         "services.a.registry: needs discovery: registry or mixed"),
        ("services: {a: {discovery: registry, registry: {service: A}}}",
         "services.a.registry.service: not a service name"),
        ("services: {a: {discovery: registry, registry: {labels: {v: [1]}}}}",
         "services.a.registry.labels.v: expected a label value (a string)"),
    ],
)
def test_discovery_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh_text(text)
    assert str(info.value) == message


def test_selector_defaults_to_the_service_itself() -> None:
    mesh = parse_mesh_text(MESH)
    assert mesh.services["echo"].registry == RegistrySelector("echo")
    assert mesh.services["echo-v2"].registry == RegistrySelector("echo", (("version", "v2"),))
    assert mesh.services["caller"].registry is None


def test_store_urls_and_records() -> None:
    from control_plane.registry.store import _decode, _encode, parse_store_url

    assert parse_store_url("etcd://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_store_url("etcd://etcd.local") == ("etcd.local", 2379)
    for bad in ("redis://x:1", "etcd://", "etcd://h:1/path"):
        with pytest.raises(ValueError):
            parse_store_url(bad)
    inst = make_instance("echo", "::1", 9000, weight=3, zone="z1", labels={"version": "v2"},
                         state=InstanceState.DRAINING)
    assert inst.id == "echo/[::1]:9000"
    assert _decode(_encode(inst)) == inst


def test_pods_static_endpoints_and_registered_instances_each_keep_one_locality() -> None:
    import dataclasses

    from control_plane.kube.state import PodEndpoint
    from control_plane.xds.resources import service_load_assignment

    mesh = parse_mesh_text(MESH)
    both = dataclasses.replace(
        mesh.services["both"], pods=(PodEndpoint("10.0.0.1", 80, zone="z1", node="n1"),)
    )
    instances = [
        make_instance("echo", "127.0.0.1", 9001),
        make_instance("echo", "127.0.0.1", 9002, zone="z1"),
        make_instance("echo", "127.0.0.1", 8000),  # listed in the file: the file's entry wins
    ]
    cla = service_load_assignment(both, instances)
    places = [
        (loc.locality.region, loc.locality.zone, loc.locality.sub_zone,
         [lb.endpoint.address.socket_address.port_value for lb in loc.lb_endpoints])
        for loc in cla.endpoints
    ]
    assert places == [
        ("pilotfish", "local", "", [8000, 9001]),
        ("", "z1", "n1", [80]),
        ("pilotfish", "z1", "", [9002]),
    ]
    assert len({p[:3] for p in places}) == len(places)
