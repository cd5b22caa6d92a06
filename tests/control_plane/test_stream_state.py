"""The per-stream xDS bookkeeping, driven with hand-built requests and no sockets."""

from __future__ import annotations

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.xds.stream_state import DeltaStream, ProtocolError, SotwStream
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.control_plane.helpers import MESH_YAML, delta, snapshot, sotw

EDITED = MESH_YAML.replace("127.0.0.1:50071", "127.0.0.1:50072")
EDITED_AGAIN = MESH_YAML.replace("127.0.0.1:50071", "127.0.0.1:50073")


class TestStateOfTheWorld:
    def test_first_request_answered_with_fresh_nonce_and_version(self) -> None:
        stream, snap = SotwStream(), snapshot()
        responses, nacks = stream.handle_request(sotw(LISTENER), snap)
        assert nacks == []
        [response] = responses
        assert response.type_url == LISTENER
        assert response.nonce == "1"
        assert response.version_info
        # Legacy wildcard: every listener in the view (greeter has a port: `greeter:50051` too,
        # and Envoy's `0.0.0.0_50051`), and `virtualOutbound`.
        assert len(response.resources) == 6

        [clusters], _ = stream.handle_request(sotw(CLUSTER), snap)
        assert clusters.nonce == "2"

    def test_ack_sends_nothing_and_is_recorded(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [response], _ = stream.handle_request(sotw(ENDPOINT, ["quotes"]), snap)
        ack = sotw(ENDPOINT, ["quotes"], version=response.version_info, nonce=response.nonce)
        assert stream.handle_request(ack, snap) == ([], [])
        [status] = stream.status(snap)
        assert status.acked_version == response.version_info
        assert status.in_sync

    def test_named_subscription_gets_only_those_names(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [response], _ = stream.handle_request(sotw(ENDPOINT, ["quotes"]), snap)
        cla = endpoint_pb2.ClusterLoadAssignment()
        [packed] = response.resources
        packed.Unpack(cla)
        assert cla.cluster_name == "quotes"

    def test_subscription_change_sends_new_set(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [first], _ = stream.handle_request(sotw(ROUTE, ["quotes"]), snap)
        [second], _ = stream.handle_request(
            sotw(ROUTE, ["quotes", "greeter"], first.version_info, first.nonce), snap
        )
        assert len(second.resources) == 2
        assert second.nonce != first.nonce

    def test_subscribing_to_a_missing_name_sends_nothing_new(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [first], _ = stream.handle_request(sotw(ROUTE, ["quotes"]), snap)
        again = sotw(ROUTE, ["quotes", "nope"], first.version_info, first.nonce)
        assert stream.handle_request(again, snap) == ([], [])

    def test_stale_nonce_is_ignored(self) -> None:
        stream = SotwStream()
        [first], _ = stream.handle_request(sotw(ENDPOINT, ["quotes"]), snapshot())
        [second] = stream.handle_snapshot(snapshot(EDITED))
        # The client NACKs the first response after the second was sent: stale, ignored.
        stale = sotw(ENDPOINT, ["quotes"], "", first.nonce, error="bad")
        assert stream.handle_request(stale, snapshot(EDITED)) == ([], [])
        [status] = stream.status(snapshot(EDITED))
        assert status.nacked_version == ""
        ack = sotw(ENDPOINT, ["quotes"], second.version_info, second.nonce)
        assert stream.handle_request(ack, snapshot(EDITED)) == ([], [])
        assert stream.status(snapshot(EDITED))[0].in_sync

    def test_nack_is_recorded_and_rejected_version_not_resent(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [good], _ = stream.handle_request(sotw(ENDPOINT, ["quotes"]), snap)
        stream.handle_request(sotw(ENDPOINT, ["quotes"], good.version_info, good.nonce), snap)
        edited = snapshot(EDITED)
        [bad] = stream.handle_snapshot(edited)
        nack = sotw(ENDPOINT, ["quotes"], good.version_info, bad.nonce, error="no port 50072")
        responses, nacks = stream.handle_request(nack, edited)
        assert responses == []  # no resend loop (go-control-plane #962)
        [event] = nacks
        assert (event.version, event.message, event.nonce) == (bad.version_info, "no port 50072",
                                                               bad.nonce)
        [status] = stream.status(edited)
        assert status.acked_version == good.version_info
        assert status.nacked_version == bad.version_info
        assert status.nack_message == "no port 50072"
        assert not status.in_sync
        # The same rejected content again (e.g. an unrelated mesh edit) is still held back.
        assert stream.handle_snapshot(snapshot(EDITED)) == []
        # The client repeats its NACK: still nothing.
        responses, _ = stream.handle_request(nack, edited)
        assert responses == []

    def test_held_back_version_released_when_newer_exists(self) -> None:
        stream = SotwStream()
        [good], _ = stream.handle_request(sotw(ENDPOINT, ["quotes"]), snapshot())
        [bad] = stream.handle_snapshot(snapshot(EDITED))
        stream.handle_request(
            sotw(ENDPOINT, ["quotes"], good.version_info, bad.nonce, error="nope"),
            snapshot(EDITED),
        )
        [newer] = stream.handle_snapshot(snapshot(EDITED_AGAIN))
        assert newer.version_info not in (good.version_info, bad.version_info)
        ack = sotw(ENDPOINT, ["quotes"], newer.version_info, newer.nonce)
        assert stream.handle_request(ack, snapshot(EDITED_AGAIN)) == ([], [])
        [status] = stream.status(snapshot(EDITED_AGAIN))
        assert status.in_sync and status.nack_message == "nope"

    def test_unchanged_view_pushes_nothing(self) -> None:
        stream = SotwStream()
        stream.handle_request(sotw(ENDPOINT, ["greeter"]), snapshot())
        # The edit touches quotes only; this subscription's content is unchanged.
        assert stream.handle_snapshot(snapshot(EDITED)) == []

    def test_wildcard_star_and_switch_to_names(self) -> None:
        stream, snap = SotwStream(), snapshot()
        [everything], _ = stream.handle_request(sotw(CLUSTER, ["*"]), snap)
        assert len(everything.resources) == 4  # and PassthroughCluster
        [one], _ = stream.handle_request(
            sotw(CLUSTER, ["quotes"], everything.version_info, everything.nonce), snap
        )
        assert len(one.resources) == 1

    def test_missing_type_url_is_a_protocol_error(self) -> None:
        with pytest.raises(ProtocolError):
            SotwStream().handle_request(sotw(""), snapshot())


class TestDelta:
    def test_wildcard_subscription_and_ack(self) -> None:
        stream, snap = DeltaStream(), snapshot()
        [response], _ = stream.handle_request(delta(CLUSTER), snap)
        assert sorted(r.name for r in response.resources) == [
            "PassthroughCluster", "greeter", "greeter-canary", "quotes"
        ]
        assert all(r.version for r in response.resources)
        assert stream.handle_request(delta(CLUSTER, nonce=response.nonce), snap) == ([], [])
        [status] = stream.status(snap)
        assert status.in_sync and status.acked_version == response.system_version_info

    def test_subscribe_and_unsubscribe(self) -> None:
        stream, snap = DeltaStream(), snapshot()
        [first], _ = stream.handle_request(delta(ENDPOINT, ["quotes"]), snap)
        assert [r.name for r in first.resources] == ["quotes"]
        [second], _ = stream.handle_request(
            delta(ENDPOINT, ["greeter"], nonce=first.nonce), snap
        )
        assert [r.name for r in second.resources] == ["greeter"]
        # Unsubscribing sends nothing; later changes to it are not pushed.
        assert stream.handle_request(delta(ENDPOINT, unsubscribe=["quotes"]), snap) == ([], [])
        assert stream.handle_snapshot(snapshot(EDITED)) == []

    def test_only_changed_resources_are_sent(self) -> None:
        stream = DeltaStream()
        stream.handle_request(delta(ENDPOINT, ["quotes", "greeter"]), snapshot())
        [push] = stream.handle_snapshot(snapshot(EDITED))
        assert [r.name for r in push.resources] == ["quotes"]
        assert list(push.removed_resources) == []

    def test_removed_resource_is_announced(self) -> None:
        stream = DeltaStream()
        stream.handle_request(delta(CLUSTER), snapshot())
        without_canary = (
            MESH_YAML.replace("split: {greeter: 90, greeter-canary: 10}", "cluster: greeter")
            .replace("  greeter-canary:\n    endpoints: [127.0.0.1:50063]\n", "")
        )
        [push] = stream.handle_snapshot(snapshot(without_canary))
        assert list(push.removed_resources) == ["greeter-canary"]

    def test_initial_versions_suppress_resending_known_resources(self) -> None:
        snap = snapshot()
        known = {"quotes": snap.of_type(ENDPOINT)["quotes"].version}
        stream = DeltaStream()
        responses, _ = stream.handle_request(delta(ENDPOINT, ["quotes"], initial=known), snap)
        assert responses == []

    def test_nack_holds_back_until_newer(self) -> None:
        stream = DeltaStream()
        [good], _ = stream.handle_request(delta(ENDPOINT, ["quotes"]), snapshot())
        stream.handle_request(delta(ENDPOINT, nonce=good.nonce), snapshot())
        [bad] = stream.handle_snapshot(snapshot(EDITED))
        responses, [event] = stream.handle_request(
            delta(ENDPOINT, nonce=bad.nonce, error="rejected"), snapshot(EDITED)
        )
        assert responses == [] and event.message == "rejected"
        assert stream.handle_snapshot(snapshot(EDITED)) == []
        [status] = stream.status(snapshot(EDITED))
        assert not status.in_sync and status.nack_message == "rejected"
        [newer] = stream.handle_snapshot(snapshot(EDITED_AGAIN))
        assert [r.name for r in newer.resources] == ["quotes"]

    def test_stale_nonce_ack_ignored_but_subscription_applies(self) -> None:
        stream, snap = DeltaStream(), snapshot()
        stream.handle_request(delta(ENDPOINT, ["quotes"]), snap)
        [response], nacks = stream.handle_request(
            delta(ENDPOINT, ["greeter"], nonce="999", error="old"), snap
        )
        assert nacks == []
        assert [r.name for r in response.resources] == ["greeter"]

    def test_unsubscribe_wildcard(self) -> None:
        stream, snap = DeltaStream(), snapshot()
        [first], _ = stream.handle_request(delta(LISTENER, ["*"]), snap)
        # With `greeter:50051`, `0.0.0.0_50051` and `virtualOutbound`.
        assert len(first.resources) == 6
        stream.handle_request(delta(LISTENER, ["quotes"], ["*"], nonce=first.nonce), snap)
        assert stream.handle_snapshot(snapshot(EDITED)) == []


def test_delta_nack_of_an_older_pipelined_response_does_not_resend() -> None:
    stream = DeltaStream()
    [first], _ = stream.handle_request(delta(ENDPOINT, ["quotes"]), snapshot())
    [second] = stream.handle_snapshot(snapshot(EDITED))
    [third] = stream.handle_snapshot(snapshot(EDITED_AGAIN))
    assert stream.handle_request(delta(ENDPOINT, nonce=first.nonce), snapshot(EDITED_AGAIN)) == (
        [], [])
    responses, [nack] = stream.handle_request(
        delta(ENDPOINT, nonce=second.nonce, error="old"), snapshot(EDITED_AGAIN)
    )
    assert responses == []  # the newer version is already in flight
    assert nack.version == second.system_version_info
    assert stream.handle_request(delta(ENDPOINT, nonce=third.nonce), snapshot(EDITED_AGAIN)) == (
        [], [])
    assert stream.status(snapshot(EDITED_AGAIN))[0].in_sync


def test_pushes_go_clusters_first_then_endpoints_listeners_routes() -> None:
    renamed = MESH_YAML.replace("greeter-canary", "greeter-beta")
    for stream in (SotwStream(), DeltaStream()):
        for type_url in (ROUTE, LISTENER, ENDPOINT, CLUSTER):
            request = (sotw(type_url, ["*"]) if isinstance(stream, SotwStream)
                       else delta(type_url, ["*"]))
            stream.handle_request(request, snapshot())
        pushed = stream.handle_snapshot(snapshot(renamed))
        assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
