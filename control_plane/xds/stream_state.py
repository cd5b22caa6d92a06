"""The xDS protocol of one ADS stream, sans-IO: requests and snapshots in, responses out.

No sockets, no clocks, no threads: the server feeds each request (and each new snapshot)
to a ``SotwStream`` or ``DeltaStream`` and writes whatever responses come back. Tests do the
same with hand-built requests.

Rules kept here (xDS protocol, "ACK/NACK and resource type instance version"):

* every response carries a fresh nonce; a request whose ``response_nonce`` is not the latest
  one sent for its type is stale and its ACK/NACK part is ignored (a state-of-the-world
  request is ignored entirely: a newer response is already on its way and the client will
  answer it; a delta request's subscription changes still apply, because they are incremental);
* a NACK (``error_detail`` set) is recorded with its message, and the rejected version is held
  back: it is not sent again to this stream until a different version exists. Re-sending it in
  reply to the NACK would loop forever (go-control-plane issue #962).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from control_plane.xds.snapshot import Snapshot, content_version
from control_plane.xds.types import Resource, push_order

CONTROL_PLANE = base_pb2.ControlPlane(identifier="pilotfish")
WILDCARD = "*"


class ProtocolError(ValueError):
    """The client broke the xDS protocol; the stream ends with INVALID_ARGUMENT."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NackReceived:
    type_url: str
    version: str
    nonce: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceDiff:
    """How the resources a client acked differ from what the control plane has for it now."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @classmethod
    def between(cls, acked: dict[str, str], current: dict[str, str]) -> ResourceDiff:
        return cls(
            added=tuple(sorted(current.keys() - acked.keys())),
            removed=tuple(sorted(acked.keys() - current.keys())),
            changed=tuple(sorted(n for n in current.keys() & acked.keys()
                                 if current[n] != acked[n])),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeStatus:
    type_url: str
    acked_version: str
    sent_version: str
    nacked_version: str
    nack_message: str
    in_sync: bool
    # What the control plane would send this client now, and how the acked set differs.
    current_version: str = ""
    diff: ResourceDiff = ResourceDiff()


@dataclass(slots=True)
class _Subscription:
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    acked_version: str = ""
    nacked_version: str = ""
    nack_message: str = ""

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def wanted(self) -> set[str] | None:
        """Names to send; ``None`` for everything of the type."""
        return None if self.wildcard else self.names

    def record_nack(self, version: str, nonce: str, type_url: str, error: str) -> NackReceived:
        self.nacked_version, self.nack_message = version, error
        return NackReceived(type_url=type_url, version=version, nonce=nonce, message=error)


def _update_names(sub: _Subscription, names: list[str], first: bool) -> None:
    """Apply a state-of-the-world subscription, which replaces the previous one."""
    # An empty list on the first request is the legacy spelling of a wildcard subscription.
    sub.wildcard = WILDCARD in names or (not names and (first or sub.wildcard))
    sub.names = set(names) - {WILDCARD}


@dataclass(slots=True)
class _SotwType(_Subscription):
    sent_version: str = ""
    sent_nonce: str = ""
    # name -> resource version, of the response in flight and of the one last acked.
    sent_resources: dict[str, str] = field(default_factory=dict)
    acked_resources: dict[str, str] = field(default_factory=dict)
    # The version this client rejected, kept back until something newer exists.
    held_back: str = ""


class SotwStream:
    """State-of-the-world ADS (StreamAggregatedResources)."""

    def __init__(self) -> None:
        self._types: dict[str, _SotwType] = {}
        self._nonces = itertools.count(1)

    def subscribed(self, type_url: str, name: str) -> bool:
        """Whether the client asked for this resource (by name or by wildcard)."""
        state = self._types.get(type_url)
        return state is not None and state.wants(name)

    def handle_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: Snapshot
    ) -> tuple[list[discovery_pb2.DiscoveryResponse], list[NackReceived]]:
        type_url = request.type_url
        if not type_url:
            raise ProtocolError("type_url is required on an aggregated stream")
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = _SotwType()
        elif request.response_nonce and request.response_nonce != state.sent_nonce:
            return [], []
        nacks: list[NackReceived] = []
        if not first and request.response_nonce:
            if request.HasField("error_detail"):
                nacks.append(state.record_nack(
                    state.sent_version, request.response_nonce, type_url,
                    request.error_detail.message,
                ))
                state.held_back = state.sent_version
            else:
                state.acked_version = request.version_info
                if request.version_info == state.sent_version:
                    state.acked_resources = state.sent_resources
        _update_names(state, list(request.resource_names), first)
        response = self._maybe_respond(type_url, state, snapshot)
        return ([response] if response else []), nacks

    def handle_snapshot(self, snapshot: Snapshot) -> list[discovery_pb2.DiscoveryResponse]:
        responses = []
        for type_url in sorted(self._types, key=push_order):
            response = self._maybe_respond(type_url, self._types[type_url], snapshot)
            if response is not None:
                responses.append(response)
        return responses

    def _maybe_respond(
        self, type_url: str, state: _SotwType, snapshot: Snapshot
    ) -> discovery_pb2.DiscoveryResponse | None:
        # The version names exactly the content sent, so "same version" means "nothing new"
        # even after a subscription change, and a rejected version is recognised if it recurs.
        resources = snapshot.select(type_url, state.wanted())
        version = content_version(resources)
        if version in (state.sent_version, state.held_back):
            return None
        state.sent_version, state.sent_nonce = version, str(next(self._nonces))
        state.sent_resources = {r.name: r.version for r in resources}
        state.held_back = ""
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[r.packed for r in resources],
            type_url=type_url,
            nonce=state.sent_nonce,
            control_plane=CONTROL_PLANE,
        )

    def status(self, snapshot: Snapshot) -> list[TypeStatus]:
        result = []
        for type_url, state in self._types.items():
            resources = snapshot.select(type_url, state.wanted())
            current = content_version(resources)
            result.append(TypeStatus(
                type_url=type_url,
                acked_version=state.acked_version,
                sent_version=state.sent_version,
                nacked_version=state.nacked_version,
                nack_message=state.nack_message,
                in_sync=state.acked_version == state.sent_version == current,
                current_version=current,
                diff=ResourceDiff.between(
                    state.acked_resources, {r.name: r.version for r in resources}
                ),
            ))
        return result


@dataclass(frozen=True, slots=True)
class _Pending:
    system_version: str
    sent: dict[str, str]
    # What the client had before this response, to restore if it rejects it.
    previous: dict[str, str | None]
    # What this response removed, with the versions the client had (for status only).
    removed: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _DeltaType(_Subscription):
    # What we believe the client holds: name → version.
    client_versions: dict[str, str] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    held_back: dict[str, str] = field(default_factory=dict)
    sent_version: str = ""


class DeltaStream:
    """Incremental ADS (DeltaAggregatedResources)."""

    def __init__(self) -> None:
        self._types: dict[str, _DeltaType] = {}
        self._nonces = itertools.count(1)

    def subscribed(self, type_url: str, name: str) -> bool:
        """Whether the client asked for this resource (by name or by wildcard)."""
        state = self._types.get(type_url)
        return state is not None and state.wants(name)

    def handle_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, snapshot: Snapshot
    ) -> tuple[list[discovery_pb2.DeltaDiscoveryResponse], list[NackReceived]]:
        type_url = request.type_url
        if not type_url:
            raise ProtocolError("type_url is required on an aggregated stream")
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = _DeltaType(
                client_versions=dict(request.initial_resource_versions),
                wildcard=not request.resource_names_subscribe,
            )
        nacks: list[NackReceived] = []
        pending = state.pending.pop(request.response_nonce, None)
        if pending is not None:
            if request.HasField("error_detail"):
                nacks.append(state.record_nack(
                    pending.system_version, request.response_nonce, type_url,
                    request.error_detail.message,
                ))
                for name, version in pending.sent.items():
                    if state.wildcard or name in state.names:
                        state.held_back[name] = version
                for name, old in pending.previous.items():
                    if state.client_versions.get(name) != pending.sent[name]:
                        continue  # unsubscribed, or a newer version was sent since
                    if old is None:
                        state.client_versions.pop(name, None)
                    else:
                        state.client_versions[name] = old
            else:
                state.acked_version = pending.system_version
        for name in request.resource_names_subscribe:
            if name == WILDCARD:
                state.wildcard = True
            else:
                state.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
        self._forget_unwanted(state)
        response = self._maybe_respond(type_url, state, snapshot, force=first and state.wildcard)
        return ([response] if response else []), nacks

    def handle_snapshot(self, snapshot: Snapshot) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        responses = []
        for type_url in sorted(self._types, key=push_order):
            response = self._maybe_respond(type_url, self._types[type_url], snapshot, force=False)
            if response is not None:
                responses.append(response)
        return responses

    @staticmethod
    def _forget_unwanted(state: _DeltaType) -> None:
        # A client drops what it unsubscribed from without being told to.
        if state.wildcard:
            return
        for name in list(state.client_versions):
            if name not in state.names:
                del state.client_versions[name]
                state.held_back.pop(name, None)

    @staticmethod
    def _diff(
        type_url: str, state: _DeltaType, snapshot: Snapshot
    ) -> tuple[list[Resource], list[str]]:
        available = snapshot.of_type(type_url)
        wanted = set(available) if state.wildcard else set()
        wanted |= state.names
        changed = [
            available[name]
            for name in sorted(wanted & set(available))
            if state.client_versions.get(name) != available[name].version
            and state.held_back.get(name) != available[name].version
        ]
        removed = sorted(
            n for n in state.client_versions
            if (state.wildcard or n in state.names) and n not in available
        )
        return changed, removed

    def _maybe_respond(
        self, type_url: str, state: _DeltaType, snapshot: Snapshot, force: bool
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        changed, removed = self._diff(type_url, state, snapshot)
        if not changed and not removed and not force:
            return None
        nonce = str(next(self._nonces))
        system_version = snapshot.version(type_url)
        previous = {r.name: state.client_versions.get(r.name) for r in changed}
        for r in changed:
            state.client_versions[r.name] = r.version
            state.held_back.pop(r.name, None)
        gone = {name: state.client_versions.pop(name) for name in removed}
        state.pending[nonce] = _Pending(system_version, {r.name: r.version for r in changed},
                                        previous, gone)
        state.sent_version = system_version
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=system_version,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed)
                for r in changed
            ],
            removed_resources=removed,
            type_url=type_url,
            nonce=nonce,
            control_plane=CONTROL_PLANE,
        )

    def status(self, snapshot: Snapshot) -> list[TypeStatus]:
        result = []
        for type_url, state in self._types.items():
            changed, removed = self._diff(type_url, state, snapshot)
            available = snapshot.of_type(type_url)
            blocked = any(
                name in available and available[name].version == version
                for name, version in state.held_back.items()
            )
            # What the client acked: what it holds, less the responses it has not answered.
            acked = dict(state.client_versions)
            for pending in state.pending.values():
                for name, old in pending.previous.items():
                    if old is None:
                        acked.pop(name, None)
                    else:
                        acked[name] = old
                acked.update(pending.removed)
            wanted = set(available) if state.wildcard else state.names & set(available)
            result.append(TypeStatus(
                type_url=type_url,
                acked_version=state.acked_version,
                sent_version=state.sent_version,
                nacked_version=state.nacked_version,
                nack_message=state.nack_message,
                in_sync=not state.pending and not changed and not removed and not blocked,
                current_version=snapshot.version(type_url),
                diff=ResourceDiff.between(
                    acked, {n: available[n].version for n in sorted(wanted)}
                ),
            ))
        return result
