"""The config a sidecar holds, in the shape of Envoy's ``/config_dump``: a list of typed dumps
(``@type`` ``envoy.admin.v3.*ConfigDump``) in protobuf's JSON mapping with the proto field
names, as Envoy prints them (durations as ``"2s"``, times in RFC 3339). Resources from the
control plane are listed as it sent them (``dynamic_*``); those of the static bootstrap as the
Envoy resources they stand for (``static_listeners``, ``static_route_configs``,
``static_clusters``; ``static_dump``). Pure: state and times in, plain JSON values out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from pilotfish.config.model import Bootstrap
from sidecar.xds.state import CLUSTER, ENDPOINT, LISTENER, ROUTE, Received
from sidecar.xds.static_dump import static_cluster, static_listener, static_route_config

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


def _static(bootstrap: Bootstrap, updated: str | None) -> dict[str, list[dict[str, Any]]]:
    stamp = {"last_updated": updated} if updated else {}
    return {
        LISTENER: [{"listener": _typed(static_listener(c, bootstrap.route_configs)), **stamp}
                   for c in bootstrap.listeners],
        CLUSTER: [{"cluster": _typed(static_cluster(bootstrap.clusters[n])), **stamp}
                  for n in sorted(bootstrap.clusters)],
        ROUTE: [{"route_config": _typed(static_route_config(bootstrap.route_configs[n])), **stamp}
                for n in sorted(bootstrap.route_configs)],
        # Envoy lists a static cluster's load assignment here too.
        ENDPOINT: [
            {"endpoint_config": _typed(static_cluster(bootstrap.clusters[n]).load_assignment),
             **stamp}
            for n in sorted(bootstrap.clusters)
        ],
    }


_STATIC_FIELD = {
    LISTENER: "static_listeners", CLUSTER: "static_clusters", ROUTE: "static_route_configs",
    ENDPOINT: "static_endpoint_configs",
}


def envoy_configs(
    node: Message,
    received: dict[str, Received] | None,
    last_updated: float,
    static: Bootstrap | None = None,
    static_updated: float = 0.0,
) -> list[dict[str, Any]]:
    """``configs`` of Envoy's ``ConfigDump``: the bootstrap's node, then listeners, clusters,
    route configs and endpoints. An Envoy listener's entry is ``{name, active_state: {version_info,
    listener, last_updated}}``; the others carry their resource and version directly.

    ``received``: what the control plane sent (None: a sidecar without one, so no dynamic
    lists). ``static``: the static bootstrap, loaded at ``static_updated``."""
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
    statics = (
        _static(static, rfc3339(static_updated) if static_updated else None)
        if static is not None else {}
    )
    for type_url, dump_type, field, key in _DUMPS:
        dump: dict[str, Any] = {"@type": f"{ADMIN}{dump_type}"}
        if statics.get(type_url):
            dump[_STATIC_FIELD[type_url]] = statics[type_url]
        if received is not None:
            dump[field] = _dynamic(received[type_url], type_url, key, updated)
            if received[type_url].version_info:
                dump["version_info"] = received[type_url].version_info
        configs.append(dump)
    return configs


def _dynamic(
    state: Received, type_url: str, key: str, updated: str | None
) -> list[dict[str, Any]]:
    entries = []
    for name in sorted(state.messages):
        entry: dict[str, Any] = {
            "version_info": state.versions.get(name, ""),
            key: _typed(state.messages[name]),
        }
        if updated:
            entry["last_updated"] = updated
        entries.append({"name": name, "active_state": entry} if type_url == LISTENER else entry)
    return entries
