from __future__ import annotations

import pytest
import yaml

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.route_policy import RoutePolicy
from pilotfish.config.route_policy_yaml import parse_route_policy
from sidecar.route.policy.bulkhead import Bulkhead
from sidecar.route.policy.runtime import RoutePolicyRuntime
from tests.unit.route.policy.fakes import FakeClock


def test_slots_up_to_the_limit_then_overflow() -> None:
    bulkhead = Bulkhead(2)
    first, second = bulkhead.try_enter(), bulkhead.try_enter()
    assert first is not None and second is not None
    assert bulkhead.try_enter() is None and bulkhead.overflows == 1
    first.release()
    first.release()  # twice is harmless
    assert bulkhead.active == 1
    assert bulkhead.try_enter() is not None


def test_an_update_keeps_the_in_flight_count_under_the_new_limit() -> None:
    runtime = RoutePolicyRuntime(RoutePolicy(max_concurrent_requests=3), FakeClock())
    assert runtime.bulkhead is not None
    held = [runtime.bulkhead.try_enter() for _ in range(3)]
    updated = runtime.updated(RoutePolicy(max_concurrent_requests=2))
    assert updated.bulkhead is runtime.bulkhead and updated.bulkhead.limit == 2
    assert updated.bulkhead.try_enter() is None  # 3 still in flight, over the new 2
    for slot in held:
        assert slot is not None
        slot.release()
    assert updated.bulkhead.active == 0
    assert runtime.updated(RoutePolicy()).bulkhead is None


def test_config() -> None:
    node = Node("services.a.routes[0]", yaml.safe_load("max_concurrent_requests: 4"))
    assert parse_route_policy(node).max_concurrent_requests == 4
    with pytest.raises(ConfigError, match=r"routes\[0\].max_concurrent_requests: expected an int"):
        parse_route_policy(Node("services.a.routes[0]", {"max_concurrent_requests": 0}))
