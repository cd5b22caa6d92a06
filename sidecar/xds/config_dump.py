"""The resources an xDS-driven sidecar holds, in the shape of Envoy's ``/config_dump``: a list
of typed dumps (``@type`` ``envoy.admin.v3.*ConfigDump``), each resource as the control plane
sent it, in protobuf's JSON mapping with the proto field names, as Envoy prints them
(durations as ``"2s"``, times in RFC 3339). Pure: the
client's state and the time of its last update in, plain JSON values out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from sidecar.xds.state import CLUSTER, ENDPOINT, LISTENER, ROUTE, Received

ADMIN = "type.googleapis.com/envoy.admin.v3."
# type -> (the ConfigDump message, its list of dynamic resources, the field of each entry)
_DUMPS = (
    (LISTENER, "ListenersConfigDump", "dynamic_listeners", "listener"),
    (CLUSTER, "ClustersConfigDump", "dynamic_active_clusters", "cluster"),
    (ROUTE, "RoutesConfigDump", "dynamic_route_configs", "route_config"),
    (ENDPOINT, "EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config"),
)


def rfc3339(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _typed(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return {"@type": f"type.googleapis.com/{message.DESCRIPTOR.full_name}", **body}


def envoy_configs(
    node: Message, received: dict[str, Received], last_updated: float
) -> list[dict[str, Any]]:
    """``configs`` of Envoy's ``ConfigDump``: the bootstrap's node, then listeners, clusters,
    route configs and endpoints. An Envoy listener's entry is ``{name, active_state: {version_info,
    listener, last_updated}}``; the others carry their resource and version directly."""
    updated = rfc3339(last_updated) if last_updated else None
    configs: list[dict[str, Any]] = [
        {
            "@type": f"{ADMIN}BootstrapConfigDump",
            "bootstrap": {
                "node": json_format.MessageToDict(node, preserving_proto_field_name=True)
            },
            **({"last_updated": updated} if updated else {}),
        }
    ]
    for type_url, dump_type, field, key in _DUMPS:
        state = received[type_url]
        entries = []
        for name in sorted(state.messages):
            entry: dict[str, Any] = {
                "version_info": state.versions.get(name, ""),
                key: _typed(state.messages[name]),
            }
            if updated:
                entry["last_updated"] = updated
            entries.append({"name": name, "active_state": entry} if type_url == LISTENER
                           else entry)
        dump: dict[str, Any] = {"@type": f"{ADMIN}{dump_type}", field: entries}
        if state.version_info:
            dump["version_info"] = state.version_info
        configs.append(dump)
    return configs
