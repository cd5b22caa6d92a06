"""Application manifests to inject: every kind injection handles, and kinds it leaves alone."""

from __future__ import annotations

from typing import Any


def _pod_spec(name: str, probes: bool = False) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": "app",
        "image": f"example/{name}:1",
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "mgmt", "containerPort": 9090}],
    }
    if probes:
        # One probe on the served port (through the sidecar), one on another (excluded).
        app["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
        app["livenessProbe"] = {"httpGet": {"path": "/live", "port": "mgmt"}}
        app["startupProbe"] = {"tcpSocket": {"port": 9091}}
    return {"containers": [app]}


def _template(
    name: str, probes: bool = False, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {"app": name}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"metadata": meta, "spec": _pod_spec(name, probes)}


def workloads() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": _template("web", probes=True),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": _template("db", annotations={"pilotfish.io/log-level": "debug"}),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "template": _template(
                    "agent",
                    annotations={
                        "pilotfish.io/exclude-outbound-ports": "5432,6379",
                        "pilotfish.io/exclude-outbound-cidrs": "169.254.169.254/32",
                        "pilotfish.io/exclude-inbound-ports": "9100",
                        "pilotfish.io/proxy-cpu": "200m",
                        "pilotfish.io/proxy-memory": "128Mi",
                        "pilotfish.io/proxy-memory-limit": "1Gi",
                    },
                ),
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "shop"},
            "spec": {
                "template": {
                    **_template("migrate"),
                    "spec": {**_pod_spec("migrate"), "restartPolicy": "Never"},
                }
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "report", "namespace": "shop"},
            "spec": {
                "schedule": "0 * * * *",
                "jobTemplate": {
                    "spec": {
                        "template": {
                            **_template("report"),
                            "spec": {**_pod_spec("report"), "restartPolicy": "OnFailure"},
                        }
                    }
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "debug", "namespace": "shop", "labels": {"app": "debug"}},
            "spec": _pod_spec("debug"),
        },
    ]


def untouched() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": "shop"},
            "data": {"a": "b"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "opted-out",
                "namespace": "shop",
                "annotations": {"sidecar.pilotfish.io/inject": "false"},
            },
            "spec": _pod_spec("opted-out"),
        },
    ]
