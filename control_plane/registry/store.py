"""Where registrations live: in this process (the default), or in etcd, shared.

The ``Registry`` core is always the view the control plane serves (EDS, List, Watch). With the
memory store it is also the record, and its leases are the TTL. With ``EtcdStore`` the record
is in etcd: each instance is a key under ``/pilotfish/registry/instances/`` attached to an etcd
lease of the registry's TTL, which heartbeats keep alive; a deregistration leaves a tombstone
key on a lease of ten TTLs. Every control plane on the same etcd watches the prefix and holds
what it sees in its core, so they serve the same endpoints, and a control plane that restarts
reads everything back. Changes made here are applied to the local core at once as well: the
caller of Register or Deregister sees them without waiting for the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from control_plane.registry.core import (
    Deregistered,
    Instance,
    InstanceState,
    InvalidInstance,
    Registry,
    UnknownInstance,
    make_instance,
)

log = logging.getLogger(__name__)

PREFIX = b"/pilotfish/registry/"
INSTANCES = PREFIX + b"instances/"
TOMBSTONES = PREFIX + b"tombstones/"
TOMBSTONE_LEASES = 10
RESYNC_DELAY = 1.0
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store cannot be reached; the caller should try again."""


class RegistryStore(Protocol):
    """What the gRPC service writes through; it reads the ``Registry`` core."""

    async def register(self, instance: Instance) -> None: ...

    async def heartbeat(self, id: str, state: InstanceState | None) -> Instance: ...

    async def deregister(self, id: str) -> Instance | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """The core is the record: registrations end with this process."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def register(self, instance: Instance) -> None:
        self._registry.register(instance)

    async def heartbeat(self, id: str, state: InstanceState | None) -> Instance:
        return self._registry.heartbeat(id, state)

    async def deregister(self, id: str) -> Instance | None:
        return self._registry.deregister(id)

    async def close(self) -> None:
        pass


def parse_store_url(url: str) -> tuple[str, int]:
    """``etcd://HOST:PORT`` → (host, port); ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.hostname:
        raise ValueError(f"expected etcd://HOST:PORT, got {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"no path expected in {url!r}")
    return parts.hostname, parts.port or 2379


def _encode(instance: Instance) -> bytes:
    return json.dumps({
        "service": instance.service, "address": instance.host, "port": instance.port,
        "weight": instance.weight, "zone": instance.zone, "labels": dict(instance.labels),
        "state": instance.state.value,
    }, sort_keys=True).encode()


def _decode(value: bytes) -> Instance:
    data = json.loads(value)
    return make_instance(
        data["service"], data["address"], int(data["port"]), weight=int(data["weight"]),
        zone=data["zone"], labels=data["labels"], state=InstanceState(data["state"]),
    )


class EtcdStore:
    def __init__(self, registry: Registry, host: str, port: int) -> None:
        import aetcd  # only control planes that use etcd load it

        self._registry = registry
        self._client = aetcd.Client(host=host, port=port, timeout=5)
        self._errors: tuple[type[BaseException], ...] = (aetcd.exceptions.ClientError,)
        self._ttl = max(1, math.ceil(registry.ttl))
        self._leases: dict[str, int] = {}  # instance id → etcd lease, as far as we know
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    async def start(self) -> None:
        """Read what etcd holds now (raises ``StoreUnavailable``), then follow its changes."""
        revision = await self._guard(self._load())
        self._task = asyncio.get_running_loop().create_task(
            self._follow(revision), name="registry-etcd-watch"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*self._errors):
            await self._client.close()

    # -- writes ----------------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        async def write() -> None:
            lease = await self._client.lease(self._ttl)
            await self._client.put(INSTANCES + instance.id.encode(), _encode(instance), lease=lease)
            await self._client.delete(TOMBSTONES + instance.id.encode())
            old = self._leases.get(instance.id)
            self._leases[instance.id] = lease.id
            if old is not None and old != lease.id:
                # The key moved to the new lease; the old one would only expire, empty.
                await self._client.revoke_lease(old)

        await self._guard(write())
        self._registry.hold(instance)

    async def heartbeat(self, id: str, state: InstanceState | None) -> Instance:
        async def renew() -> Instance:
            key = INSTANCES + id.encode()
            found = await self._client.get(key)
            if found is None:
                self._leases.pop(id, None)
                if await self._client.get(TOMBSTONES + id.encode()) is not None:
                    raise Deregistered(id)
                raise UnknownInstance(id)
            reply = await self._client.refresh_lease(found.lease)
            if reply is None or reply.TTL <= 0:
                raise UnknownInstance(id)  # expired between the two calls
            self._leases[id] = found.lease
            instance = _decode(found.value)
            if state is not None and state is not instance.state:
                instance = make_instance(
                    instance.service, instance.host, instance.port, weight=instance.weight,
                    zone=instance.zone, labels=dict(instance.labels), state=state,
                )
                await self._client.put(key, _encode(instance), lease=found.lease)
                self._registry.hold(instance)
            return instance

        return await self._guard(renew())

    async def deregister(self, id: str) -> Instance | None:
        async def remove() -> Instance | None:
            found = await self._client.delete(INSTANCES + id.encode(), prev_kv=True)
            if found is None or not found.deleted:
                return None
            lease = await self._client.lease(self._ttl * TOMBSTONE_LEASES)
            await self._client.put(TOMBSTONES + id.encode(), b"", lease=lease)
            old = self._leases.pop(id, None)
            if old is not None:
                await self._client.revoke_lease(old)
            return _decode(found.prev_kv.value) if found.prev_kv is not None else None

        instance = await self._guard(remove())
        self._registry.drop(id)
        return instance

    # -- following etcd --------------------------------------------------------------------

    async def _load(self) -> int:
        """Hold exactly what etcd has; returns the revision it was read at."""
        found = await self._client.get_prefix(INSTANCES)
        present: dict[str, Instance] = {}
        for kv in found:
            instance = self._parse(kv.key, kv.value)
            if instance is not None:
                present[instance.id] = instance
                self._leases[instance.id] = kv.lease
        for instance in self._registry.instances():
            if instance.id not in present:
                self._registry.drop(instance.id)
        for instance in present.values():
            self._registry.hold(instance)
        self.synced.set()
        revision: int = found.header.revision
        return revision

    async def _follow(self, revision: int) -> None:
        """Apply etcd's changes; after a broken watch, read everything again and go on."""
        while True:
            try:
                watch = await self._client.watch_prefix(INSTANCES, start_revision=revision + 1)
                async for event in watch:
                    revision = max(revision, event.kv.mod_revision)
                    self._apply(event)
            except self._errors as exc:
                log.warning("registry store: etcd watch broken (%s); resyncing", exc)
            while True:
                await asyncio.sleep(RESYNC_DELAY)
                try:
                    revision = await self._load()
                    break
                except self._errors as exc:
                    log.warning("registry store: etcd unreachable: %s", exc)

    def _apply(self, event: Any) -> None:
        id = event.kv.key[len(INSTANCES):].decode()
        if event.kind == "DELETE":
            self._leases.pop(id, None)
            if self._registry.drop(id) is not None:
                log.info("registry store: %s left (deregistered or its lease expired)", id)
            return
        instance = self._parse(event.kv.key, event.kv.value)
        if instance is not None:
            self._leases[instance.id] = event.kv.lease
            self._registry.hold(instance)

    @staticmethod
    def _parse(key: bytes, value: bytes) -> Instance | None:
        try:
            return _decode(value)
        except (ValueError, KeyError, TypeError, InvalidInstance) as exc:
            # Someone else wrote there: skip it, loudly, and keep serving the rest.
            log.error("registry store: ignoring %r: %s", key, exc)
            return None

    async def _guard(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except self._errors as exc:
            raise StoreUnavailable(f"etcd: {exc}") from exc
