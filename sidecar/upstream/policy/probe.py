"""What an active health probe is, apart from how it probes (HTTP in ``health_probes``, gRPC in
``grpc_probe``, which only sidecars that check over gRPC import)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


class Probe(Protocol):
    async def check(self, host: str, port: int) -> ProbeResult: ...

    def forget(self, host: str, port: int) -> None: ...

    async def close(self) -> None: ...


def log_task_failure(task: asyncio.Task[None]) -> None:
    """A done callback for a probe's background task: its crash is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
