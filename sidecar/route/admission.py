"""Admission: whether a request may go on at all, before and after its route is known.

In: the listener's state (draining, a refusal set by a filter in front, the load shedder) and,
once the route is matched, the route's live policy (local rate limit, bulkhead). Out: either a
``Refusal`` (the counter to bump and what to answer) or what the admitted request holds
(``Admitted``: an in-flight mark of the shedder, a bulkhead slot), given back at its end.

The exchange enters this stage only when one of these is configured or set: a listener that
is not draining, with no shedder, and a route without a rate limit or bulkhead never calls in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from sidecar.flags import ResponseFlag
from sidecar.route.policy.bulkhead import OVERFLOW_COUNTER as BULKHEAD_OVERFLOW_COUNTER
from sidecar.route.policy.bulkhead import OVERFLOW_FLAG as BULKHEAD_OVERFLOW_FLAG
from sidecar.route.policy.reply import LocalReply

if TYPE_CHECKING:
    from sidecar.route.policy.bulkhead import BulkheadSlot
    from sidecar.route.policy.runtime import RoutePolicyRuntime
    from sidecar.route.policy.shedding import InFlight, LoadShedder


class Refusal:
    """Why a request is answered locally: ``counter`` (None: none) and a flag or a reply."""

    __slots__ = ("answer", "counter")

    def __init__(self, answer: ResponseFlag | LocalReply, counter: str | None = None) -> None:
        self.answer = answer
        self.counter = counter


class Admitted:
    """What an admitted request holds until it ends (``release``, once)."""

    __slots__ = ("inflight", "slot")

    def __init__(self) -> None:
        self.inflight: InFlight | None = None
        self.slot: BulkheadSlot | None = None

    def release(self) -> None:
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.done()
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()


def admit_listener(
    held: Admitted, draining: bool, refused: ResponseFlag | None, shedder: LoadShedder | None
) -> Refusal | None:
    """The listener's admission, in Envoy's order: draining, a filter's refusal, shedding."""
    if draining:
        return Refusal(ResponseFlag.DRAINING)
    if refused is not None:
        return Refusal(refused)
    if shedder is not None:
        held.inflight = shedder.try_admit()
        if held.inflight is None:
            return Refusal(shedder.reply, "downstream_rq_overload_shed")
    return None


def admit_route(
    held: Admitted,
    policy: RoutePolicyRuntime,
    headers: Mapping[str, str],
    peer_ip: Callable[[], str | None],
    grpc: bool,
) -> Refusal | None:
    """The route's admission: its local rate limit, then its bulkhead."""
    limiter = policy.rate_limiter
    if limiter is not None:
        verdict = limiter.check(limiter.caller_key(headers, peer_ip()))
        if not verdict.allowed:
            return Refusal(verdict.local_reply(grpc), "downstream_rq_rate_limited")
    if policy.bulkhead is not None:
        held.slot = policy.bulkhead.try_enter()
        if held.slot is None:
            return Refusal(BULKHEAD_OVERFLOW_FLAG, BULKHEAD_OVERFLOW_COUNTER)
    return None
