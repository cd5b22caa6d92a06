"""Fault injection: delay some requests, abort others, to rehearse failure on purpose.

Decided once per request, before the route's upstream is called: first the delay (the router
waits, then carries on; Envoy flag DI), then the abort (a local reply with the configured status;
flag FI). With a ``header`` matcher only matching requests are touched, so a tester can aim
faults at their own calls (``x-pilotfish-fault: on``) on a live mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pilotfish.config.route_policy import FaultConfig
from sidecar.route.policy import RandomSource
from sidecar.route.policy.reply import LocalReply

DELAY_FLAG_CODE = "DI"
ABORT_FLAG_CODE = "FI"
"""Envoy's flags for injected delays and aborts, carried by the replies themselves."""


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float | None = None
    """Seconds to hold the request before going on."""
    abort: LocalReply | None = None
    """Answer with this instead of calling the upstream (after the delay, if any)."""

    @property
    def injects(self) -> bool:
        return self.delay is not None or self.abort is not None


NO_FAULT = FaultDecision()


def _hit(percentage: float, random: RandomSource) -> bool:
    return random() * 100.0 < percentage


class FaultInjector:
    """The faults of one route."""

    __slots__ = ("_abort_reply", "config")

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        abort = config.abort
        self._abort_reply = (
            LocalReply.from_statuses(
                abort.http_status, abort.grpc_status, "fault filter abort", ABORT_FLAG_CODE
            )
            if abort is not None
            else None
        )

    def decide(self, headers: Mapping[str, str], random: RandomSource) -> FaultDecision:
        """``headers``: the request's, by lower-case name (e.g. ``LazyHeaderMap``).

        The coin is tossed once for the delay and once for the abort, each only if configured,
        so a seeded source gives the same sequence of decisions every run."""
        config = self.config
        matcher = config.header
        if matcher is not None and not matcher.matches(headers.get(matcher.name)):
            return NO_FAULT
        delay = None
        if config.delay is not None and _hit(config.delay.percentage, random):
            delay = config.delay.duration
        abort = None
        if config.abort is not None and _hit(config.abort.percentage, random):
            abort = self._abort_reply
        if delay is None and abort is None:
            return NO_FAULT
        return FaultDecision(delay, abort)
