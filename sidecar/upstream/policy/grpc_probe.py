"""The gRPC health probe (``grpc.health.v1.Health/Check``), in a module of its own so that
sidecars without gRPC health checks never import grpc."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pilotfish.config.cluster_policy import HealthCheckConfig
from sidecar.upstream.policy.probe import ProbeResult, log_task_failure


class GrpcProbe:
    """``grpc.health.v1.Health/Check`` for ``service_name``; healthy if ``SERVING``."""

    def __init__(self, config: HealthCheckConfig) -> None:
        self.config = config
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(target)
        return channel

    async def check(self, host: str, port: int) -> ProbeResult:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        stub = health_pb2_grpc.HealthStub(self._channel(target))
        request = health_pb2.HealthCheckRequest(service=self.config.service_name)
        try:
            response = await stub.Check(request, timeout=self.config.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return ProbeResult(False, "timeout")
            return ProbeResult(False, f"grpc status {code.name}: {exc.details()}")
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return ProbeResult(status == "SERVING", status)

    def forget(self, host: str, port: int) -> None:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        channel = self._channels.pop(target, None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(
                channel.close(), name=f"close health check channel {target}"
            )
            task.add_done_callback(log_task_failure)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
