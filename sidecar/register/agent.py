"""The I/O side of registration: probes the app, talks to the registry, runs the registrar.

One task probes the app's health (the same probes as active health checking), feeds the
``Registrar`` and sends the commands it returns to the control plane's registry, in order.
``leave()`` stops that task and deregisters, waiting for the proxies that could call this
instance to drop it (the first steps of a graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2

from pilotfish.config.cluster_policy import HealthCheckConfig
from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from sidecar.register.registrar import (
    Command,
    Deregister,
    Heartbeat,
    HeartbeatRejected,
    Register,
    Registrar,
)
from sidecar.upstream.policy.health import HealthChecker
from sidecar.upstream.policy.health_probes import make_probe

log = logging.getLogger("pilotfish.register")

APP = "app"
RPC_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationOptions:
    registry: str
    """HOST:PORT of the control plane that serves the registry."""
    service: str
    host: str
    port: int
    """Where callers reach this instance: the sidecar's inbound listener."""
    app_host: str
    app_port: int
    weight: int = 1
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)


def _duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


class RegistrationAgent:
    def __init__(
        self,
        options: RegistrationOptions,
        ready: Callable[[], bool],
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
    ) -> None:
        """``ready``: whether the sidecar can take inbound calls (its config is in force).
        ``credentials``: mutual TLS to the registry (the control plane's mTLS port, which binds
        registration to our identity), asked for again whenever the registry is unreachable, so
        that a rotated certificate replaces an expired one."""
        self.options = options
        self._credentials = credentials
        self._ready = ready
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.registrar = Registrar(self._clock)
        self._checker = HealthChecker(options.health, self._clock, random.Random())
        self._checker.set_hosts([APP])
        self._probe = make_probe(options.health, options.service)
        self._channel = self._connect()
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._commands: deque[Command] = deque()
        self._poke = asyncio.Event()
        # The registry names an instance after these three, so it is known before Register
        # answers: a shutdown while that call is in flight can still deregister it.
        address = f"[{options.host}]" if ":" in options.host else options.host
        self._id = f"{options.service}/{address}:{options.port}"
        self._task: asyncio.Task[None] | None = None

    def _connect(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.options.registry)
        return grpc.aio.secure_channel(self.options.registry, self._credentials())

    async def _reconnect(self) -> None:
        old, self._channel = self._channel, self._connect()
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        await old.close()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registration")
        self._task.add_done_callback(_log_failure)

    def set_draining(self, draining: bool) -> None:
        """``/healthcheck/fail`` (True) and ``/healthcheck/ok`` (False)."""
        self._queue(self.registrar.set_draining(draining))

    async def leave(self) -> None:
        """Stop probing and deregister, waiting (capped) for the callers' proxies."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for command in self.registrar.leave():
            await self._send(command)
        await self._probe.close()
        await self._channel.close()

    # -- the loop --------------------------------------------------------------------------

    def _queue(self, commands: list[Command]) -> None:
        if commands:
            self._commands.extend(commands)
            self._poke.set()

    async def _run(self) -> None:
        opts = self.options
        while True:
            now = self._clock()
            if self._checker.next_check_at(APP) <= now:
                result = await self._probe.check(opts.app_host, opts.app_port)
                if not result.ok and self.registrar.app_healthy:
                    log.info("app health check failed: %s", result.detail)
                self._checker.result(APP, result.ok, self._clock())
            healthy = self._checker.is_healthy(APP) and self._ready()
            self._queue(self.registrar.app_health(healthy))
            self._queue(self.registrar.tick())
            while self._commands:
                await self._send(self._commands.popleft())
            wake = min(
                t for t in (self._checker.next_due(), self.registrar.next_wakeup())
                if t is not None
            )
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, wake - self._clock()))

    async def _send(self, command: Command) -> None:
        registrar = self.registrar
        opts = self.options
        state = registry_pb2.SERVING
        if isinstance(command, Register | Heartbeat) and command.draining:
            state = registry_pb2.DRAINING
        try:
            if isinstance(command, Register):
                instance = registry_pb2.Instance(
                    service=opts.service, address=opts.host, port=opts.port, weight=opts.weight,
                    zone=opts.zone, labels=opts.labels, state=state,
                )
                reply = await self._stub.Register(
                    registry_pb2.RegisterRequest(instance=instance), timeout=RPC_TIMEOUT
                )
                self._id = reply.id
                log.info("registered %s (heartbeat every %.1fs)", reply.id,
                         reply.heartbeat_interval.ToNanoseconds() / 1e9)
                self._queue(registrar.registered(reply.heartbeat_interval.ToNanoseconds() / 1e9))
            elif isinstance(command, Heartbeat):
                await self._stub.Heartbeat(
                    registry_pb2.HeartbeatRequest(id=self._id, state=state),
                    timeout=registrar.heartbeat_interval or RPC_TIMEOUT,
                )
                registrar.heartbeat_ok()
            else:
                await self._deregister(command)
        except grpc.aio.AioRpcError as exc:
            self._rejected(command, exc)
            if exc.code() is grpc.StatusCode.UNAVAILABLE and self._credentials is not None:
                # Perhaps our certificate expired on this channel: the next try uses the newest.
                await self._reconnect()

    async def _deregister(self, command: Deregister) -> None:
        reply = await self._stub.Deregister(
            registry_pb2.DeregisterRequest(
                id=self._id, await_proxies=_duration(command.await_proxies)
            ),
            timeout=command.await_proxies + RPC_TIMEOUT,
        )
        if reply.pending:
            log.warning("deregistered %s; %d proxies had not acked its removal after %.1fs: %s",
                        self._id, len(reply.pending), command.await_proxies,
                        ", ".join(reply.pending))
        else:
            log.info("deregistered %s; %d proxies acked its removal", self._id, len(reply.acked))

    def _rejected(self, command: Command, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        log.warning("registry: %s failed: %s: %s", type(command).__name__, code.name,
                    exc.details())
        if isinstance(command, Register):
            self._queue(self.registrar.register_failed())
        elif isinstance(command, Heartbeat):
            why = {
                grpc.StatusCode.NOT_FOUND: HeartbeatRejected.EXPIRED,
                grpc.StatusCode.FAILED_PRECONDITION: HeartbeatRejected.DEREGISTERED,
            }.get(code, HeartbeatRejected.UNREACHABLE)
            self._queue(self.registrar.heartbeat_rejected(why))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("registration stopped", exc_info=task.exception())
