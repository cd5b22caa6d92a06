"""A small client of the registry for apps without a sidecar: register, heartbeat, discover.

    client = RegistryClient("127.0.0.1:15010")
    with client.register("quotes", "10.0.0.7", 50071, labels={"version": "v2"}) as reg:
        ...                       # heartbeats run in a background thread
        reg.set_draining(True)    # callers stop sending new requests
    # leaving the block deregisters, waiting for the callers' proxies to drop the instance

    for instance in client.instances("quotes"): ...     # client-side discovery
    for instances in client.watch("quotes"): ...        # every change, as it happens

Blocking calls on a grpcio channel, so any app can use it, threaded or not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from types import TracebackType

import grpc

from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegisteredInstance:
    id: str
    service: str
    host: str
    port: int
    weight: int
    zone: str
    labels: Mapping[str, str]
    draining: bool

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _instance(message: registry_pb2.Instance) -> RegisteredInstance:
    return RegisteredInstance(
        id=message.id, service=message.service, host=message.address, port=message.port,
        weight=message.weight, zone=message.zone, labels=dict(message.labels),
        draining=message.state == registry_pb2.DRAINING,
    )


class Registration:
    """One registered instance; heartbeats until ``deregister()`` (or the ``with`` block ends)."""

    def __init__(self, stub: registry_pb2_grpc.RegistryStub, request: registry_pb2.RegisterRequest,
                 timeout: float) -> None:
        self._stub = stub
        self._request = request
        self._timeout = timeout
        self._draining = False
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        reply = stub.Register(request, timeout=timeout)
        self.id: str = reply.id
        self.heartbeat_interval: float = reply.heartbeat_interval.ToNanoseconds() / 1e9
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.id}",
                                        daemon=True)
        self._thread.start()

    def set_draining(self, draining: bool) -> None:
        """DRAINING: still registered, but callers send no new requests; False undoes it."""
        with self._lock:
            self._draining = draining
            self._heartbeat()

    def stop_heartbeats(self) -> None:
        """Stop renewing the lease without leaving: the registry evicts the instance when its
        lease runs out (what a crash looks like, or a client that is closing)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def deregister(self, await_proxies: float | None = None) -> registry_pb2.DeregisterResponse:
        """Leave; by default wait (two heartbeat periods at most) until the proxies that could
        call this instance acknowledged its removal. The reply lists those that had not."""
        self.stop_heartbeats()
        wait = 2 * self.heartbeat_interval if await_proxies is None else await_proxies
        request = registry_pb2.DeregisterRequest(id=self.id)
        request.await_proxies.FromNanoseconds(round(wait * 1e9))
        reply: registry_pb2.DeregisterResponse = self._stub.Deregister(
            request, timeout=wait + self._timeout
        )
        return reply

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_interval):
            with self._lock:
                try:
                    self._heartbeat()
                except grpc.RpcError as exc:
                    if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                        log.warning("%s was deregistered by someone else; stopping", self.id)
                        return
                    log.warning("heartbeat of %s failed: %s", self.id, exc.code().name)

    def _heartbeat(self) -> None:
        state = registry_pb2.DRAINING if self._draining else registry_pb2.SERVING
        try:
            self._stub.Heartbeat(registry_pb2.HeartbeatRequest(id=self.id, state=state),
                                 timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            # The lease ran out (or the registry restarted): join again as we were.
            self._request.instance.state = state
            self._stub.Register(self._request, timeout=self._timeout)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.deregister()


class RegistryClient:
    def __init__(self, address: str, timeout: float = 5.0) -> None:
        """``address``: the control plane (HOST:PORT) that serves the registry."""
        self._channel = grpc.insecure_channel(address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._timeout = timeout
        self._registrations: list[Registration] = []

    def register(self, service: str, host: str, port: int, *, weight: int = 1, zone: str = "",
                 labels: Mapping[str, str] | None = None) -> Registration:
        """Join now; ``grpc.RpcError`` INVALID_ARGUMENT names a bad field."""
        instance = registry_pb2.Instance(service=service, address=host, port=port, weight=weight,
                                         zone=zone, labels=dict(labels or {}))
        registration = Registration(
            self._stub, registry_pb2.RegisterRequest(instance=instance), self._timeout
        )
        self._registrations.append(registration)
        return registration

    def instances(self, service: str = "") -> list[RegisteredInstance]:
        reply = self._stub.List(registry_pb2.ListRequest(service=service), timeout=self._timeout)
        return [_instance(i) for i in reply.instances]

    def watch(self, service: str = "") -> Generator[list[RegisteredInstance], None, None]:
        """The instances now, then after every change; ends when the registry goes away.
        Closing the iterator (``close()``) cancels the watch."""
        stream = self._stub.Watch(registry_pb2.WatchRequest(service=service))
        try:
            for reply in stream:
                yield [_instance(i) for i in reply.instances]
        finally:
            stream.cancel()

    def close(self) -> None:
        """Stop every registration's heartbeats (deregister first to leave) and disconnect."""
        for registration in self._registrations:
            registration.stop_heartbeats()
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
