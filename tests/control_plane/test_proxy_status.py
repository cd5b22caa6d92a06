"""``pilotfish proxy-status``: what each proxy acked against what the control plane has now,
resource by resource; the bookkeeping without sockets, the table from a status reply."""

from __future__ import annotations

from control_plane.status_cli import format_proxy_status
from control_plane.xds.stream_state import DeltaStream, ResourceDiff, SotwStream
from control_plane.xds.types import CLUSTER, ENDPOINT
from pilotfish.gen.pilotfish.status.v1 import status_pb2
from tests.control_plane.helpers import MESH_YAML, delta, snapshot, sotw

# greeter-canary removed, quotes' endpoints changed, a new service "weather" added.
EDITED = (
    MESH_YAML.replace("        split: {greeter: 90, greeter-canary: 10}\n", "")
    .replace("  greeter-canary:\n    endpoints: [127.0.0.1:50063]\n", "")
    .replace("127.0.0.1:50071", "127.0.0.1:50072")
    + "  weather:\n    endpoints: [127.0.0.1:50081]\n"
)
DIFF = ResourceDiff(added=("weather",), removed=("greeter-canary",), changed=("quotes",))


def test_state_of_the_world_diff_until_the_ack() -> None:
    stream, snap = SotwStream(), snapshot()
    [first], _ = stream.handle_request(sotw(ENDPOINT), snap)
    stream.handle_request(sotw(ENDPOINT, [], first.version_info, first.nonce), snap)
    [status] = stream.status(snap)
    assert status.in_sync and status.diff == ResourceDiff()
    assert status.current_version == status.acked_version == first.version_info

    edited = snapshot(EDITED)
    [second] = stream.handle_snapshot(edited)
    [status] = stream.status(edited)
    assert not status.in_sync
    assert (status.acked_version, status.current_version) == (
        first.version_info, second.version_info
    )
    assert status.diff == DIFF

    stream.handle_request(sotw(ENDPOINT, [], second.version_info, second.nonce), edited)
    [status] = stream.status(edited)
    assert status.in_sync and status.diff == ResourceDiff()


def test_state_of_the_world_nack_keeps_the_diff() -> None:
    stream, snap = SotwStream(), snapshot()
    [first], _ = stream.handle_request(sotw(ENDPOINT), snap)
    stream.handle_request(sotw(ENDPOINT, [], first.version_info, first.nonce), snap)
    edited = snapshot(EDITED)
    [second] = stream.handle_snapshot(edited)
    stream.handle_request(sotw(ENDPOINT, [], first.version_info, second.nonce, error="no"), edited)
    [status] = stream.status(edited)
    assert status.nacked_version == second.version_info
    assert status.diff == DIFF


def test_delta_diff_until_the_ack() -> None:
    stream, snap = DeltaStream(), snapshot()
    [first], _ = stream.handle_request(delta(CLUSTER, ["*"]), snap)
    stream.handle_request(delta(CLUSTER, nonce=first.nonce), snap)
    [status] = stream.status(snap)
    assert status.in_sync and status.diff == ResourceDiff()
    edited = snapshot(EDITED)
    [second] = stream.handle_snapshot(edited)
    [status] = stream.status(edited)
    assert not status.in_sync
    # quotes' cluster is the same: only its endpoints changed.
    assert status.diff == ResourceDiff(added=("weather",), removed=("greeter-canary",))
    stream.handle_request(delta(CLUSTER, nonce=second.nonce), edited)
    [status] = stream.status(edited)
    assert status.in_sync and status.diff == ResourceDiff()


def test_the_table() -> None:
    synced = status_pb2.ProxyStatus(node_id="greeter-1", service="greeter", in_sync=True)
    for type_url in (CLUSTER, ENDPOINT):
        synced.resources.add(type_url=type_url, acked_version="v1", sent_version="v1",
                             current_version="v1", in_sync=True)
    behind = status_pb2.ProxyStatus(node_id="quotes-1", service="quotes")
    behind.resources.add(type_url=CLUSTER, acked_version="v1", sent_version="v1",
                         current_version="v1", in_sync=True)
    behind.resources.add(
        type_url=ENDPOINT, acked_version="v1", sent_version="v2", current_version="v2",
        last_nack_version="v2", last_nack_message="bad endpoint", added=["weather"],
        changed=["quotes"], removed=["greeter-canary"],
    )
    assert format_proxy_status([synced, behind]) == (
        "NODE       SERVICE  CDS     LDS       EDS     RDS\n"
        "greeter-1  greeter  SYNCED  NOT SENT  SYNCED  NOT SENT\n"
        "quotes-1   quotes   SYNCED  NOT SENT  NACKED  NOT SENT\n"
        "\n"
        "quotes-1 EDS: acked v1, control plane has v2\n"
        "  + weather\n"
        "  ~ quotes\n"
        "  - greeter-canary\n"
        "  rejected v2: bad endpoint\n"
    )
