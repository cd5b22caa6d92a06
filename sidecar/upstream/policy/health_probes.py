"""The I/O edge of active health checking: the probes, and the loop that runs them.

``HttpProbe`` sends ``GET <path>`` over a fresh HTTP/1.1 connection and judges the status
line; ``GrpcProbe`` calls ``grpc.health.v1.Health/Check`` over one kept channel per host and
wants ``SERVING``; an mTLS cluster's endpoints get either over mTLS (``mtls_probe``). All
bound a probe by ``config.timeout``. ``HealthCheckRunner`` keeps one task per host that
sleeps until ``HealthChecker.next_check_at``, probes, and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from sidecar.upstream.policy.health import HealthChanged, HealthChecker
from sidecar.upstream.policy.probe import Probe, ProbeResult, log_task_failure

if TYPE_CHECKING:
    from pilotfish.config.security import UpstreamMtls
    from sidecar.security.workload import WorkloadCertificates

log = logging.getLogger(__name__)

_MAX_STATUS_LINE = 8192


class HttpProbe:
    """``GET path`` on a new connection; healthy if the status is one of ``expected_statuses``."""

    def __init__(self, config: HealthCheckConfig, authority: str) -> None:
        self.config = config
        self.authority = config.host or authority

    async def check(self, host: str, port: int) -> ProbeResult:
        try:
            async with asyncio.timeout(self.config.timeout):
                status = await self._get(host, port)
        except TimeoutError:
            return ProbeResult(False, "timeout")
        except OSError as exc:  # refused, reset, unreachable
            return ProbeResult(False, f"connection failed: {exc}")
        except ValueError as exc:  # not HTTP
            return ProbeResult(False, str(exc))
        return ProbeResult(self.config.status_ok(status), f"status {status}")

    def forget(self, host: str, port: int) -> None:
        pass  # nothing kept per host: every probe opens its own connection

    async def close(self) -> None:
        pass

    async def _get(self, host: str, port: int) -> int:
        reader, writer = await asyncio.open_connection(host, port, limit=_MAX_STATUS_LINE)
        try:
            request = (
                f"GET {self.config.path} HTTP/1.1\r\n"
                f"Host: {self.authority}\r\n"
                "User-Agent: pilotfish-health-check\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(request.encode("latin-1"))
            await writer.drain()
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.IncompleteReadError:
                raise ValueError("connection closed before a status line") from None
            except asyncio.LimitOverrunError:
                raise ValueError("status line too long") from None
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP/1.x status line: {line[:80]!r}")
            return int(parts[1])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def make_probe(
    config: HealthCheckConfig,
    authority: str,
    mtls: UpstreamMtls | None = None,
    workload: Callable[[], WorkloadCertificates | None] = lambda: None,
) -> Probe:
    """The probe ``config`` asks for; ``authority`` is the HTTP Host when none is set. A cluster
    with ``mtls`` is probed over mTLS with the ``workload`` certificate, as its requests are."""
    if mtls is not None:
        from sidecar.upstream.policy.mtls_probe import MtlsProbe

        return MtlsProbe(config, authority, workload, mtls.identities)
    if config.type is HealthCheckType.GRPC:
        # grpc costs ~20 MB of memory: only sidecars that check over gRPC load it.
        from sidecar.upstream.policy.grpc_probe import GrpcProbe

        return GrpcProbe(config)
    return HttpProbe(config, authority)


class HealthCheckRunner:
    """Runs ``probe`` against every host on the ``checker``'s schedule; reports changes.

    ``checker.clock`` must be the event loop's clock (``loop.time``) for the sleeps to line
    up with the schedule. ``on_change`` is called with every ``HostBecameHealthy`` /
    ``HostBecameUnhealthy``; it runs on the loop and must not block.
    """

    def __init__(
        self,
        checker: HealthChecker,
        probe: Probe,
        on_change: Callable[[HealthChanged], None],
    ) -> None:
        self.checker = checker
        self.probe = probe
        self.on_change = on_change
        self._tasks: dict[str, tuple[tuple[str, int], asyncio.Task[None]]] = {}

    def set_hosts(self, hosts: Mapping[str, tuple[str, int]]) -> None:
        """``hosts`` maps each host key to its address; starts and stops checks to match."""
        self.checker.set_hosts(hosts)
        loop = asyncio.get_running_loop()
        for key in list(self._tasks):
            address, task = self._tasks[key]
            if hosts.get(key) != address:
                task.cancel()
                del self._tasks[key]
                self.probe.forget(*address)
        for key, address in hosts.items():
            if key not in self._tasks:
                task = loop.create_task(self._run(key, address), name=f"health-check {key}")
                task.add_done_callback(log_task_failure)
                self._tasks[key] = (address, task)

    async def _run(self, key: str, address: tuple[str, int]) -> None:
        checker = self.checker
        while key in checker.hosts:
            delay = checker.next_check_at(key) - checker.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await self.probe.check(*address)
            if not result.ok:
                log.debug("health check of %s failed: %s", key, result.detail)
            event = checker.result(key, result.ok, checker.clock())
            if event is not None:
                log.info("health check: %s is now %s", key, type(event).__name__)
                self.on_change(event)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.probe.close()
