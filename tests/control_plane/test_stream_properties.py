"""Property tests: whatever happens on a stream, a client that acks ends up with the snapshot.

A simulated client applies responses it ACKs and drops those it NACKs. After any sequence of
subscription changes, mesh edits, ACKs, NACKs and stale messages, one more (fresh) edit and
ACKing everything must leave the client holding exactly the snapshot's resources for its
subscription, and no two consecutive state-of-the-world responses repeat a version.
"""

from __future__ import annotations

from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.xds.snapshot import Snapshot
from control_plane.xds.stream_state import DeltaStream, SotwStream
from control_plane.xds.types import ENDPOINT
from tests.control_plane.helpers import MESH_YAML, delta, snapshot, sotw

NAMES = ("greeter", "greeter-canary", "quotes")
PORTS = ("50061", "50063", "50071")


def _variant(i: int) -> Snapshot:
    text = MESH_YAML
    for port in PORTS:
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{int(port) + 100 * i}")
    return snapshot(text)


SNAPSHOTS = [_variant(i) for i in range(3)]
FRESH = _variant(9)
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["subscribe", "unsubscribe", "edit", "ack", "nack", "stale"]),
        st.integers(0, 2),
    ),
    max_size=25,
)


def _expected(snap: Snapshot, names: set[str]) -> dict[str, str]:
    return {r.name: r.version for r in snap.select(ENDPOINT, names)}


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_delta_client_converges(actions: list[tuple[str, int]]) -> None:
    stream, snap = DeltaStream(), SNAPSHOTS[0]
    subscribed: set[str] = {"quotes"}
    held: dict[str, str] = {}
    inbox: list[Any] = []
    out, _ = stream.handle_request(delta(ENDPOINT, ["quotes"]), snap)
    inbox += out
    nonces: set[str] = {r.nonce for r in out}

    def answer(error: str | None) -> None:
        response = inbox.pop(0)
        if error is None:
            for resource in response.resources:
                if resource.name in subscribed:
                    held[resource.name] = resource.version
            for name in response.removed_resources:
                held.pop(name, None)
        out, _ = stream.handle_request(delta(ENDPOINT, nonce=response.nonce, error=error), snap)
        inbox.extend(out)

    for action, arg in actions:
        name = NAMES[arg]
        if action == "subscribe" and name not in subscribed:
            subscribed.add(name)
            out, _ = stream.handle_request(delta(ENDPOINT, [name]), snap)
        elif action == "unsubscribe" and name in subscribed:
            subscribed.discard(name)
            held.pop(name, None)
            out, _ = stream.handle_request(delta(ENDPOINT, unsubscribe=[name]), snap)
        elif action == "edit":
            snap = SNAPSHOTS[arg]
            out = stream.handle_snapshot(snap)
        elif action in ("ack", "nack") and inbox:
            answer(None if action == "ack" else "rejected")
            continue
        elif action == "stale":
            out, nacks = stream.handle_request(delta(ENDPOINT, nonce="stale", error="x"), snap)
            assert nacks == []
        else:
            continue
        for response in out:
            assert response.nonce not in nonces
            nonces.add(response.nonce)
        inbox.extend(out)

    snap = FRESH
    inbox.extend(stream.handle_snapshot(snap))
    for _ in range(50):
        if not inbox:
            break
        answer(None)
    assert held == _expected(snap, subscribed)
    assert all(t.in_sync for t in stream.status(snap))


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_sotw_client_converges(actions: list[tuple[str, int]]) -> None:
    stream, snap = SotwStream(), SNAPSHOTS[0]
    subscribed = ["quotes"]
    versions: list[str] = []
    latest: Any = None
    acked_version = ""

    def take(out: list[Any]) -> None:
        nonlocal latest
        for response in out:
            assert not versions or response.version_info != versions[-1]
            versions.append(response.version_info)
            latest = response

    out, _ = stream.handle_request(sotw(ENDPOINT, subscribed), snap)
    take(out)
    for action, arg in actions:
        name = NAMES[arg]
        nonce = latest.nonce if latest is not None else ""
        if action == "subscribe" and name not in subscribed:
            subscribed = sorted({*subscribed, name})
            out, _ = stream.handle_request(sotw(ENDPOINT, subscribed, acked_version, nonce), snap)
        elif action == "unsubscribe" and name in subscribed:
            subscribed = [n for n in subscribed if n != name]
            out, _ = stream.handle_request(sotw(ENDPOINT, subscribed, acked_version, nonce), snap)
        elif action == "edit":
            snap = SNAPSHOTS[arg]
            out = stream.handle_snapshot(snap)
        elif action == "ack" and latest is not None:
            acked_version = latest.version_info
            out, _ = stream.handle_request(
                sotw(ENDPOINT, subscribed, acked_version, latest.nonce), snap)
        elif action == "nack" and latest is not None:
            out, nacks = stream.handle_request(
                sotw(ENDPOINT, subscribed, acked_version, latest.nonce, error="no"), snap)
            assert out == []  # never an immediate resend of what was just rejected
        elif action == "stale":
            out, nacks = stream.handle_request(
                sotw(ENDPOINT, subscribed, acked_version, "stale", error="x"), snap)
            assert out == [] and nacks == []
        else:
            continue
        take(out)

    snap = FRESH
    take(stream.handle_snapshot(snap))
    assert latest is not None
    stream.handle_request(sotw(ENDPOINT, subscribed, latest.version_info, latest.nonce), snap)
    assert sorted(_expected(snap, set(subscribed))) == sorted(
        _name_of(p) for p in latest.resources
    )
    assert all(t.in_sync for t in stream.status(snap))


def _name_of(packed: Any) -> str:
    cla = endpoint_pb2.ClusterLoadAssignment()
    packed.Unpack(cla)
    return str(cla.cluster_name)
