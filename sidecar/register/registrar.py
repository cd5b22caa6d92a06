"""When to register, heartbeat and deregister, sans-IO: events in, commands out. Takes a clock.

The app joins the registry only once it is healthy, heartbeats while it stays healthy, and is
pulled (deregistered) as soon as it is not. ``/healthcheck/fail`` keeps the instance registered
but DRAINING, so callers send it nothing new; ``/healthcheck/ok`` puts it back. ``leave()``
deregisters for good (shutdown). A lease the registry lost (expired, or a control plane that
restarted) is registered again; an instance the registry deregistered on purpose stays out.

The I/O side runs the commands in order, one at a time, and reports each outcome back.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pilotfish.register")

RETRY_MIN = 0.25
RETRY_MAX = 5.0


class Phase(enum.Enum):
    WAITING = "waiting"  # the app is not healthy (yet): not registered
    REGISTERING = "registering"
    REGISTERED = "registered"
    REMOVED = "removed"  # deregistered by someone else: stays out
    LEFT = "left"  # shutting down: never again


@dataclass(frozen=True, slots=True)
class Register:
    draining: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    draining: bool


@dataclass(frozen=True, slots=True)
class Deregister:
    await_proxies: float
    """Seconds the registry may wait for the proxies to drop the endpoint; 0: no wait."""


Command = Register | Heartbeat | Deregister


class HeartbeatRejected(enum.Enum):
    EXPIRED = "expired"  # no such lease: register again
    DEREGISTERED = "deregistered"  # taken out on purpose: stay out
    UNREACHABLE = "unreachable"  # the registry did not answer: keep trying


class Registrar:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.phase = Phase.WAITING
        self.app_healthy = False
        self.draining = False
        self.heartbeat_interval: float | None = None
        self._next_heartbeat_at: float | None = None
        self._retry_at: float | None = None
        self._retry_delay = RETRY_MIN

    # -- events ----------------------------------------------------------------------------

    def app_health(self, healthy: bool) -> list[Command]:
        if healthy == self.app_healthy:
            return []
        self.app_healthy = healthy
        if healthy and self.phase is Phase.WAITING:
            return self._register()
        if not healthy and self.phase in (Phase.REGISTERING, Phase.REGISTERED):
            log.warning("app unhealthy: pulling its endpoint from the registry")
            self.phase = Phase.WAITING
            self._next_heartbeat_at = None
            return [Deregister(0.0)]
        return []

    def set_draining(self, draining: bool) -> list[Command]:
        if draining == self.draining:
            return []
        self.draining = draining
        if self.phase is Phase.REGISTERED:
            return [Heartbeat(draining)]  # now, not at the next beat: callers should know
        return []

    def registered(self, heartbeat_interval: float) -> list[Command]:
        """The registry accepted the registration and asks for beats this often."""
        if self.phase is not Phase.REGISTERING:
            return []  # pulled or left meanwhile; a Deregister is already queued
        self.phase = Phase.REGISTERED
        self.heartbeat_interval = heartbeat_interval
        self._next_heartbeat_at = self._clock() + heartbeat_interval
        self._retry_delay = RETRY_MIN
        return []

    def register_failed(self) -> list[Command]:
        if self.phase is Phase.REGISTERING:
            self.phase = Phase.WAITING
            self._schedule_retry()
        return []

    def heartbeat_ok(self) -> None:
        self._retry_delay = RETRY_MIN

    def heartbeat_rejected(self, why: HeartbeatRejected) -> list[Command]:
        if self.phase is not Phase.REGISTERED:
            return []
        if why is HeartbeatRejected.DEREGISTERED:
            log.warning("deregistered by the registry: staying out until restarted")
            self.phase = Phase.REMOVED
            self._next_heartbeat_at = None
            return []
        if why is HeartbeatRejected.EXPIRED:
            log.warning("the registry lost this instance's lease: registering again")
            self.phase = Phase.WAITING
            return self._register()
        # Unreachable: beat again soon; the lease outlives a few missed beats.
        assert self.heartbeat_interval is not None
        self._next_heartbeat_at = self._clock() + min(self._retry_delay, self.heartbeat_interval)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        return []

    def leave(self, await_proxies: float | None = None) -> list[Command]:
        """Shut down: deregister (waiting, by default, two heartbeat periods at most)."""
        was = self.phase
        self.phase = Phase.LEFT
        self._next_heartbeat_at = self._retry_at = None
        if was not in (Phase.REGISTERING, Phase.REGISTERED):
            return []
        if await_proxies is None:
            await_proxies = 2 * (self.heartbeat_interval or 0.0)
        return [Deregister(await_proxies)]

    # -- time ------------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        times = [t for t in (self._next_heartbeat_at, self._retry_at) if t is not None]
        return min(times, default=None)

    def tick(self) -> list[Command]:
        now = self._clock()
        if self._retry_at is not None and self._retry_at <= now:
            self._retry_at = None
            if self.phase is Phase.WAITING and self.app_healthy:
                return self._register()
        if (
            self.phase is Phase.REGISTERED
            and self._next_heartbeat_at is not None
            and self._next_heartbeat_at <= now
        ):
            assert self.heartbeat_interval is not None
            self._next_heartbeat_at = now + self.heartbeat_interval
            return [Heartbeat(self.draining)]
        return []

    # -- helpers ---------------------------------------------------------------------------

    def _register(self) -> list[Command]:
        self.phase = Phase.REGISTERING
        self._retry_at = None
        return [Register(self.draining)]

    def _schedule_retry(self) -> None:
        self._retry_at = self._clock() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
