"""The registrar's decisions on a fake clock: health gating, heartbeats, draining, leaving."""

from __future__ import annotations

from sidecar.register.registrar import (
    Deregister,
    Heartbeat,
    HeartbeatRejected,
    Phase,
    Register,
    Registrar,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def registered(interval: float = 1.0) -> tuple[Registrar, Clock]:
    clock = Clock()
    r = Registrar(clock)
    assert r.app_health(True) == [Register(draining=False)]
    assert r.registered(interval) == []
    return r, clock


def test_registers_only_once_the_app_is_healthy() -> None:
    r = Registrar(Clock())
    assert r.app_health(False) == []
    assert r.tick() == [] and r.next_wakeup() is None
    assert r.app_health(True) == [Register(draining=False)]
    assert r.app_health(True) == []  # no second registration while the first is in flight
    assert r.phase is Phase.REGISTERING


def test_heartbeats_every_interval_while_healthy() -> None:
    r, clock = registered(2.0)
    assert r.next_wakeup() == 2.0
    clock.now = 1.9
    assert r.tick() == []
    clock.now = 2.0
    assert r.tick() == [Heartbeat(draining=False)]
    assert r.next_wakeup() == 4.0


def test_an_unhealthy_app_is_pulled_and_registered_again_when_healthy() -> None:
    r, _ = registered()
    assert r.app_health(False) == [Deregister(0.0)]
    assert r.phase is Phase.WAITING and r.next_wakeup() is None
    assert r.app_health(True) == [Register(draining=False)]


def test_draining_is_sent_at_once_and_registrations_carry_it() -> None:
    r, _ = registered()
    assert r.set_draining(True) == [Heartbeat(draining=True)]
    assert r.set_draining(True) == []
    assert r.set_draining(False) == [Heartbeat(draining=False)]
    fresh = Registrar(Clock())
    assert fresh.set_draining(True) == []
    assert fresh.app_health(True) == [Register(draining=True)]


def test_leaving_waits_two_heartbeat_periods_at_most_and_is_final() -> None:
    r, clock = registered(1.5)
    assert r.leave() == [Deregister(3.0)]
    assert r.phase is Phase.LEFT
    clock.now = 100
    assert r.tick() == [] and r.app_health(False) == [] and r.app_health(True) == []
    assert Registrar(Clock()).leave() == []  # never registered: nothing to undo


def test_a_lost_lease_is_registered_again_a_deregistration_is_respected() -> None:
    r, _ = registered()
    assert r.heartbeat_rejected(HeartbeatRejected.EXPIRED) == [Register(draining=False)]
    r.registered(1.0)
    assert r.heartbeat_rejected(HeartbeatRejected.DEREGISTERED) == []
    assert r.phase is Phase.REMOVED and r.next_wakeup() is None
    assert r.app_health(False) == [] and r.app_health(True) == []


def test_an_unreachable_registry_is_retried_with_backoff() -> None:
    r, clock = registered(4.0)
    clock.now = 4.0
    assert r.tick() == [Heartbeat(draining=False)]
    assert r.heartbeat_rejected(HeartbeatRejected.UNREACHABLE) == []
    assert r.next_wakeup() == 4.25
    clock.now = 4.25
    assert r.tick() == [Heartbeat(draining=False)]
    r.heartbeat_rejected(HeartbeatRejected.UNREACHABLE)
    assert r.next_wakeup() == 4.75


def test_a_failed_registration_is_retried_while_the_app_stays_healthy() -> None:
    clock = Clock()
    r = Registrar(clock)
    r.app_health(True)
    assert r.register_failed() == []
    assert r.next_wakeup() == 0.25
    clock.now = 0.25
    assert r.tick() == [Register(draining=False)]
    r.register_failed()
    r.app_health(False)
    clock.now = 10
    assert r.tick() == []  # no longer healthy: nothing to retry
