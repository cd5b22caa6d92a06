"""The registry's state, sans-IO: instances, their leases, eviction. Takes a clock.

An instance holds a lease of ``ttl`` seconds (``missed_heartbeats`` heartbeat intervals, three
by default) that each heartbeat renews; ``expire()`` evicts the instances whose lease ran out.
The owner calls it when ``next_expiry()`` comes. Nothing here sleeps or touches a socket.

An instance deregistered on purpose leaves a tombstone for a while, so that a heartbeat still
in flight from it (or from a sidecar that does not know yet) cannot bring it back: the
heartbeat fails with ``Deregistered`` and the instance stays out until it registers again.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

DEFAULT_HEARTBEAT_INTERVAL = 2.0
DEFAULT_MISSED_HEARTBEATS = 3
MAX_WEIGHT = 128  # EDS: load_balancing_weight of an endpoint is 1 to 128
TOMBSTONE_LEASES = 10
_SERVICE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class InstanceState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # still registered, but sent no new requests


class RegistryError(Exception):
    """Base of the registry's errors."""


class InvalidInstance(RegistryError):
    """A registration with a bad field; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class UnknownInstance(RegistryError):
    """No lease by that id: it expired (or never existed). Register again."""


class Deregistered(RegistryError):
    """The instance was deregistered; it stays out until it registers again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    service: str
    host: str
    port: int
    weight: int = 1
    zone: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    """Sorted (key, value) pairs, so equal label sets compare equal."""
    state: InstanceState = InstanceState.SERVING
    id: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", instance_id(self.service, self.host, self.port))

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def instance_id(service: str, host: str, port: int) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{service}/{address}"


def make_instance(
    service: str,
    host: str,
    port: int,
    *,
    weight: int = 0,
    zone: str = "",
    labels: Mapping[str, str] | None = None,
    state: InstanceState = InstanceState.SERVING,
) -> Instance:
    """A checked instance; ``InvalidInstance`` names the first bad field."""
    if not _SERVICE_NAME.match(service):
        raise InvalidInstance(
            "service", "lower-case letters, digits, '-' and '.', starting and ending with a "
            f"letter or digit (got {service!r})"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # EDS endpoints are socket addresses: a name would need a resolver in every proxy.
        raise InvalidInstance("address", f"expected an IP address, got {host!r}") from None
    if not 0 < port < 65536:
        raise InvalidInstance("port", f"expected 1 to 65535, got {port}")
    if weight == 0:
        weight = 1
    if not 0 < weight <= MAX_WEIGHT:
        raise InvalidInstance("weight", f"expected 1 to {MAX_WEIGHT}, got {weight}")
    pairs = sorted((labels or {}).items())
    for key, value in pairs:
        if not _LABEL_KEY.match(key):
            raise InvalidInstance(f"labels.{key}", "a label key is 1 to 63 letters, digits, "
                                  "'-', '_', '.' or '/', starting and ending alphanumeric")
        if not _LABEL_VALUE.match(value):
            raise InvalidInstance(f"labels.{key}", f"bad label value {value!r}")
    if len(zone) > 128:
        raise InvalidInstance("zone", "at most 128 characters")
    return Instance(
        service=service, host=host, port=port, weight=weight, zone=zone, labels=tuple(pairs),
        state=state,
    )


@dataclass(slots=True)
class _Lease:
    instance: Instance
    expires_at: float


class Registry:
    """Instances by id, each with a lease; ``revision`` counts the changes."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        missed_heartbeats: int = DEFAULT_MISSED_HEARTBEATS,
    ) -> None:
        if heartbeat_interval <= 0 or missed_heartbeats < 1:
            raise ValueError("heartbeat_interval > 0 and missed_heartbeats >= 1 are required")
        self._clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.ttl = heartbeat_interval * missed_heartbeats
        self._leases: dict[str, _Lease] = {}
        self._tombstones: dict[str, float] = {}
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self.revision = 0

    # -- changes ---------------------------------------------------------------------------

    def register(self, instance: Instance) -> Instance:
        now = self._clock()
        self._tombstones.pop(instance.id, None)
        old = self._leases.get(instance.id)
        self._leases[instance.id] = _Lease(instance, now + self.ttl)
        if old is None or old.instance != instance:
            self._changed({instance.service})
        return instance

    def heartbeat(self, id: str, state: InstanceState | None = None) -> Instance:
        """Renew a lease, and change the instance's state if ``state`` is given."""
        now = self._clock()
        lease = self._leases.get(id)
        if lease is None:
            if id in self._tombstones:
                raise Deregistered(id)
            raise UnknownInstance(id)
        lease.expires_at = now + self.ttl
        if state is not None and state is not lease.instance.state:
            lease.instance = replace(lease.instance, state=state)
            self._changed({lease.instance.service})
        return lease.instance

    def deregister(self, id: str) -> Instance | None:
        lease = self._leases.pop(id, None)
        if lease is None:
            return None
        self._tombstones[id] = self._clock() + self.ttl * TOMBSTONE_LEASES
        self._changed({lease.instance.service})
        return lease.instance

    def hold(self, instance: Instance) -> None:
        """Keep an instance whose lease lives elsewhere (in etcd): it never expires here."""
        old = self._leases.get(instance.id)
        self._leases[instance.id] = _Lease(instance, math.inf)
        if old is None or old.instance != instance:
            self._changed({instance.service})

    def drop(self, id: str) -> Instance | None:
        """Forget an instance whose lease lives elsewhere (it ended there); no tombstone."""
        lease = self._leases.pop(id, None)
        if lease is None:
            return None
        self._changed({lease.instance.service})
        return lease.instance

    def expire(self) -> list[Instance]:
        """Evict every instance whose lease has run out; forget old tombstones."""
        now = self._clock()
        gone = [lease.instance for lease in self._leases.values() if lease.expires_at <= now]
        for instance in gone:
            del self._leases[instance.id]
        for id, until in list(self._tombstones.items()):
            if until <= now:
                del self._tombstones[id]
        if gone:
            self._changed({i.service for i in gone})
        return gone

    def next_expiry(self) -> float | None:
        """When ``expire()`` next has something to do (clock time), None when nothing is held."""
        times = [lease.expires_at for lease in self._leases.values()]
        times += self._tombstones.values()
        earliest = min(times, default=None)
        return earliest if earliest is not None and earliest != math.inf else None

    # -- reading ---------------------------------------------------------------------------

    def get(self, id: str) -> Instance | None:
        lease = self._leases.get(id)
        return lease.instance if lease is not None else None

    def instances(self, service: str | None = None) -> list[Instance]:
        """By id, of one service or of all."""
        return [
            self._leases[id].instance
            for id in sorted(self._leases)
            if service is None or self._leases[id].instance.service == service
        ]

    def services(self) -> set[str]:
        return {lease.instance.service for lease in self._leases.values()}

    def on_change(self, listener: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """Call ``listener`` with the services that changed; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self, services: Iterable[str]) -> None:
        self.revision += 1
        changed = frozenset(services)
        for listener in list(self._listeners):
            listener(changed)
