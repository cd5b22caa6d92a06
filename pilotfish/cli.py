"""The ``pilotfish`` command line."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one worth showing (not None, '' or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the nearest name for a misspelled command, choice or flag.

    Each subcommand checks its own leftovers, so a misspelled flag is reported with that
    subcommand's usage rather than the top-level one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            names = [str(choice) for choice in choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(names)}"
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({hint})")
        super()._check_value(action, value)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.unrecognized(extras)
        return parsed, extras

    def unrecognized(self, extras: list[str]) -> NoReturn:
        known = [flag for action in self._actions for flag in action.option_strings]
        hints = []
        for extra in extras:
            if extra.startswith("-"):
                close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1)
                if close:
                    hints.append(f"{extra.split('=', 1)[0]}: did you mean {close[0]}?")
        message = f"unrecognized arguments: {' '.join(extras)}"
        self.error("; ".join([message, *hints]))


LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_sidecar(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("sidecar", help="run the sidecar proxy")
    p.add_argument("--config", help="static bootstrap YAML (listeners, routes, clusters, admin)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    p.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="verbosity"
    )
    p.add_argument(
        "--otlp-endpoint",
        help="export traces here (turns tracing on); wins over the bootstrap and the control plane",
    )
    p.add_argument(
        "--trace-sampling", type=float, help="fraction of requests to trace, 0 to 1 (e.g. 0.01)"
    )
    xds = p.add_argument_group("live config from a control plane (xDS)")
    xds.add_argument(
        "--xds", metavar="HOST:PORT",
        help="control plane address (its mTLS port with --control-plane-roots)",
    )
    xds.add_argument("--node-id", help="this proxy's xDS node id (default: the host name)")
    xds.add_argument("--service", default="", help="the service this sidecar runs beside")
    xds.add_argument("--namespace", default="default", help="the service's namespace")
    xds.add_argument("--app-address", default="", help="HOST:PORT of the local app (inbound)")
    xds.add_argument("--inbound-address", default="", help="HOST:PORT for inbound calls")
    xds.add_argument(
        "--outbound-address", default="127.0.0.1:15001", help="HOST:PORT the app calls out through"
    )
    xds.add_argument(
        "--outbound-passthrough",
        default="none",
        choices=("none", "original-destination"),
        help="where the outbound listener relays what is not HTTP (behind `pilotfish iptables`: "
        "original-destination)",
    )
    xds.add_argument(
        "--admin-address",
        default="127.0.0.1:15000",
        help="HOST:PORT; state changes (POST) are taken from loopback only, wherever it binds",
    )
    xds.add_argument(
        "--health-address",
        default="",
        help="HOST:PORT serving only GET /ready, for kubelet probes (e.g. 0.0.0.0:15021)",
    )
    mesh = p.add_argument_group("workload identity (mTLS listeners)")
    mesh.add_argument(
        "--ca-token-file", help="bootstrap or service-account token; turns the identity on"
    )
    mesh.add_argument("--ca", metavar="HOST:PORT", help="the CA (default: the --xds address)")
    mesh.add_argument(
        "--control-plane-roots", metavar="PEM_FILE",
        help="the mesh's root certificates: the CA (--ca: its TLS port) is then called over "
        "TLS and xDS (--xds: its mTLS port) over mutual TLS with the workload certificate",
    )
    mesh.add_argument("--service-account", help="default: --service")
    mesh.add_argument("--trust-domain", default="cluster.local")
    reg = p.add_argument_group(
        "registration (the app joins the control plane's registry once it is healthy)"
    )
    reg.add_argument("--register", action="store_true", help="register the app as --service")
    reg.add_argument(
        "--register-address", default="", metavar="HOST:PORT",
        help="where callers reach this instance (default: --inbound-address)",
    )
    reg.add_argument("--register-weight", type=int, default=1, help="1 to 128")
    reg.add_argument("--register-zone", default="")
    reg.add_argument(
        "--register-label", action="append", default=[], metavar="KEY=VALUE",
        help="e.g. version=v2 (repeatable); routes select subsets by labels",
    )
    reg.add_argument(
        "--register-health", default="grpc", metavar="grpc|http:PATH",
        help="how the app's health is checked before and while registered (default grpc)",
    )
    reg.add_argument(
        "--register-health-interval", type=float, default=1.0, metavar="SECONDS",
        help="seconds between health checks of the app (default 1)",
    )


def _add_control_plane(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("control-plane", help="run the xDS control plane")
    p.add_argument("--config", required=True, help="mesh file (YAML)")
    p.add_argument("--port", type=int, default=15010, help="xDS gRPC port")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--metrics-address", default="", help="HOST:PORT for Prometheus (e.g. 0.0.0.0:15014)"
    )
    p.add_argument(
        "--registry-heartbeat-interval", type=float, default=2.0, metavar="SECONDS",
        help="how often registered instances renew; three missed heartbeats evict (default 2)",
    )
    p.add_argument(
        "--registry-store", default="", metavar="etcd://HOST:PORT",
        help="keep registrations in etcd, shared by every control plane on it (default: memory)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="verbosity")
    p.add_argument(
        "--unknown-nodes",
        default="serve",
        choices=("serve", "reject"),
        help="a proxy whose service is not in the mesh gets every service (serve) or is "
        "refused with PERMISSION_DENIED (reject)",
    )
    ca = p.add_argument_group("certificate authority (workload certificates)")
    ca.add_argument("--ca-dir", help="directory of a self-signed root CA (made on first start)")
    ca.add_argument("--ca-cert", help="an intermediate CA certificate (PEM) to sign with")
    ca.add_argument("--ca-key", help="the intermediate CA's private key (PEM)")
    ca.add_argument("--ca-roots", help="root certificates workloads should trust (PEM)")
    ca.add_argument("--ca-chain", help="intermediates between --ca-cert and a root (PEM)")
    ca.add_argument("--trust-domain", default="cluster.local")
    ca.add_argument("--cert-ttl", default="24h", help="workload certificate lifetime")
    ca.add_argument("--bootstrap-tokens", help="YAML file mapping tokens to services")
    ca.add_argument(
        "--ca-token-audience",
        default="pilotfish-ca",
        help="with --kubernetes: service-account tokens for this audience are checked through "
        "TokenReview",
    )
    tls = p.add_argument_group(
        "TLS ports (need the CA; the serving certificate comes from it and rotates)"
    )
    tls.add_argument(
        "--ca-tls-port", type=int, metavar="PORT",
        help="the CA over server-side TLS: workloads get their first certificate here",
    )
    tls.add_argument(
        "--xds-mtls-port", type=int, metavar="PORT",
        help="ADS (and the CA) over mutual TLS: a proxy gets the view of its certificate's "
        "identity",
    )
    tls.add_argument(
        "--tls-names", default="localhost", metavar="NAME[,NAME...]",
        help="DNS names of the serving certificate: the names clients dial (default localhost)",
    )
    tls.add_argument(
        "--plaintext-address", default="", metavar="ADDRESS",
        help="where the plaintext --port listens (default --address; e.g. 127.0.0.1)",
    )
    tls.add_argument(
        "--no-plaintext", action="store_true",
        help="serve only the TLS ports (pilotfish status then has no port to read)",
    )
    kube = p.add_argument_group("Kubernetes discovery")
    kube.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch Services and EndpointSlices: pods become endpoints (in a pod: its service "
        "account; elsewhere --kubeconfig, $KUBECONFIG or ~/.kube/config)",
    )
    kube.add_argument("--kubeconfig", default="", help="kubeconfig file (default: see above)")
    kube.add_argument(
        "--kube-namespaces",
        default="",
        metavar="NS[,NS...]",
        help="watch only these namespaces (default: all; RBAC then needs a ClusterRole)",
    )
    kube.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    hook = p.add_argument_group("sidecar injection webhook (HTTPS)")
    hook.add_argument("--webhook-address", default="", help="HOST:PORT, e.g. 0.0.0.0:15017")
    hook.add_argument("--webhook-cert", default="", help="PEM certificate (chain) file")
    hook.add_argument("--webhook-key", default="", help="PEM private key file")
    hook.add_argument("--inject-image", default="pilotfish:dev", help="the sidecar's image")
    hook.add_argument(
        "--inject-xds-address",
        default="control-plane.pilotfish.svc:15010",
        help="the control plane's address, as injected sidecars reach it",
    )
    hook.add_argument(
        "--inject-classic", action="store_true", help="inject classic (not native) sidecars"
    )
    hook.add_argument(
        "--inject-ca-address", default="", metavar="HOST:PORT",
        help="the CA's TLS port as sidecars reach it: injected sidecars get a projected token "
        "(--ca-token-audience), the CA's roots, and hold xDS over mTLS (--inject-xds-address "
        "is then the --xds-mtls-port)",
    )


def _add_validate(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "validate", help="check a mesh file or a sidecar bootstrap offline (every error)"
    )
    p.add_argument("file", help="mesh file or sidecar bootstrap (YAML); which one is recognised")


def _add_status(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("status", help="show the proxies connected to a control plane")
    p.add_argument("--address", default="127.0.0.1:15010", help="control plane gRPC address")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")


def _add_proxy_status(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "proxy-status",
        help="each proxy's acked xDS versions against the control plane's, and what differs",
        description="Per proxy and xDS type: SYNCED (acked what the control plane has now), "
        "STALE or NACKED, and for each type not in sync the resources added (+), changed (~) "
        "or removed (-) since the version it acked. Exit code 3 when a proxy is not in sync.",
    )
    p.add_argument("node", nargs="?", help="only this proxy (node id)")
    p.add_argument("--address", default="127.0.0.1:15010", help="control plane gRPC address")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")


def _add_proxy_config(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "proxy-config",
        help="one sidecar's listeners, routes, clusters and endpoints with their health",
        description="Finds the node's admin interface through the control plane (or --admin) "
        "and shows what the sidecar runs.",
    )
    p.add_argument("node", help="the proxy's node id")
    p.add_argument("--address", default="127.0.0.1:15010", help="control plane gRPC address")
    p.add_argument("--admin", default="", help="HOST:PORT of the sidecar's admin (skips the "
                   "control plane)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")


def _add_top(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "top",
        help="live success rate, requests/s and p50/p99 per service and route, from the "
        "sidecars' metrics",
        description="Scrapes each sidecar's /stats/prometheus every --interval seconds and shows "
        "what happened in between: rates from the counters' growth, p50 and p99 from the "
        "growth of the latency histogram's buckets. Sidecars come from --admin, else from the "
        "control plane (each sidecar reports its admin address). A success is a response that "
        "is neither a 5xx nor a gRPC status other than OK.",
    )
    p.add_argument(
        "--admin", action="append", metavar="HOST:PORT[,HOST:PORT...]",
        help="a sidecar's admin address (repeatable; default: ask the control plane)",
    )
    p.add_argument("--address", default="127.0.0.1:15010", help="control plane gRPC address")
    p.add_argument("-n", "--interval", type=float, default=2.0, help="seconds between scrapes")
    p.add_argument(
        "--direction", default="outbound", choices=("outbound", "inbound", "all"),
        help="outbound: as the callers' sidecars saw the calls (failures the service never "
        "saw included); inbound: as the service's own sidecar saw them",
    )
    p.add_argument("--once", action="store_true", help="scrape twice, print one table, exit")
    p.add_argument("-o", "--output", default="table", choices=("table", "json"))
    p.add_argument("--timeout", type=float, default=2.0, help="seconds, per request")


def _add_demo(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a small local mesh with its control plane, change its policy while traffic "
        "flows, and show the effect of each change",
        description="Starts a control plane on a mesh file in the run folder and two sample gRPC "
        "services (greeter calls quotes), every instance behind a sidecar that takes its config "
        "over ADS and registers its app. While calls flow, it rewrites the mesh file phase by "
        "phase (round robin; a 90/10 canary split; a 10%% fault absorbed by retries; an "
        "instance drained with SIGTERM) and shows each change acked by the sidecars and its "
        "effect, measured from the traffic. Exit code 1 when a phase does not show its effect.",
    )
    p.add_argument(
        "--duration", type=float, default=16.0,
        help="seconds of measured traffic, split evenly over the four phases",
    )
    p.add_argument("--rate", type=float, default=50.0, help="calls per second")
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="trace every call and export the sidecars' spans over OTLP/gRPC to URL, e.g. "
        "http://127.0.0.1:4317 (default: $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the run folder (mesh file, logs) after the run"
    )


def _add_iptables(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "iptables",
        help="send a pod's TCP through its sidecar (nat rules; needs NET_ADMIN)",
        description="Install (apply), remove (clean) or print (show) the interception rules. "
        "Port and CIDR lists are comma-separated; '*' means all, '' none.",
    )
    p.add_argument("action", nargs="?", default="apply", choices=("apply", "clean", "show"))
    p.add_argument("--inbound-port", type=int, default=15006, help="the sidecar's inbound port")
    p.add_argument("--outbound-port", type=int, default=15001, help="the sidecar's outbound port")
    p.add_argument("--proxy-uid", default="1337", help="the sidecar's UID, never redirected")
    p.add_argument("--proxy-gid", default="", help="a GID never redirected (default: none)")
    p.add_argument("--inbound-ports", default="*", help="inbound ports to redirect")
    p.add_argument("--exclude-inbound-ports", default="15000,15090", help="never redirected")
    p.add_argument("--outbound-cidrs", default="*", help="outbound destinations to redirect")
    p.add_argument("--exclude-outbound-cidrs", default="", help="never redirected")
    p.add_argument("--outbound-ports", default="*", help="outbound ports to redirect")
    p.add_argument("--exclude-outbound-ports", default="", help="never redirected")
    p.add_argument("--iptables-save", default="iptables-save", help="e.g. iptables-legacy-save")
    p.add_argument(
        "--iptables-restore", default="iptables-restore", help="e.g. iptables-legacy-restore"
    )


def _add_ca_root(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("ca-root", help="rotate the CA's self-signed root in three steps")
    p.add_argument("step", choices=("stage", "activate", "retire"))
    p.add_argument("--ca-dir", required=True, help="the control plane's --ca-dir")
    p.add_argument("--trust-domain", default="cluster.local")


def _add_identity_agent(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "identity-agent", help="keep a workload certificate fresh and serve it to Envoy over SDS"
    )
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the control plane's CA")
    p.add_argument(
        "--control-plane-roots", metavar="PEM_FILE",
        help="the mesh's roots: call the CA over TLS (its --ca-tls-port) rather than plaintext",
    )
    p.add_argument("--token-file", required=True, help="bootstrap or service-account token")
    p.add_argument("--service-account", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--sds-socket", required=True, help="Unix socket path for Envoy's SDS")
    p.add_argument("--cert-ttl", default="", help="ask for a shorter lifetime than the CA's")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="verbosity")


def _add_inject(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "inject",
        help="print Kubernetes manifests with the sidecar added",
        description="Reads YAML (one or more documents), adds the Pilotfish sidecar to every "
        "Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob, and prints the "
        "result; other kinds pass through. Injecting twice changes nothing.",
    )
    p.add_argument("-f", "--filename", default="-", help="manifest file ('-': stdin)")
    p.add_argument("--image", default="pilotfish:dev", help="the Pilotfish image")
    p.add_argument(
        "--xds-address",
        default="control-plane.pilotfish.svc:15010",
        help="the control plane's xDS address, as the sidecars reach it",
    )
    p.add_argument(
        "--classic",
        action="store_true",
        help="the sidecar as an ordinary container (clusters before 1.29; Jobs never finish)",
    )
    p.add_argument(
        "--proxy-log-level", default="info", choices=LOG_LEVELS, help="the sidecar's verbosity"
    )
    p.add_argument(
        "--ca-address", default="", metavar="HOST:PORT",
        help="the CA's TLS port: sidecars get a workload identity and use mTLS to xDS "
        "(--xds-address is then the control plane's mTLS port); needs --ca-roots",
    )
    p.add_argument("--ca-roots", default="", metavar="PEM_FILE", help="the mesh's roots")
    p.add_argument("--ca-token-audience", default="pilotfish-ca")
    p.add_argument("--trust-domain", default="cluster.local")


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked: ``importlib.metadata`` costs every other
    command, the sidecar first, 2.4 MB resident."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        print(f"pilotfish {_version()}")
        parser.exit()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pilotfish")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from pilotfish import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pilotfish",
        description="Pilotfish, a service mesh: the sidecar proxy, the xDS control plane, tools.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_sidecar(sub)
    _add_control_plane(sub)
    _add_validate(sub)
    _add_status(sub)
    _add_proxy_status(sub)
    _add_proxy_config(sub)
    _add_top(sub)
    _add_demo(sub)
    _add_iptables(sub)
    _add_ca_root(sub)
    _add_identity_agent(sub)
    _add_inject(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pilotfish.otlp_protos import install

    install()  # before anything imports opentelemetry.proto (see pilotfish/otlp_protos.py)
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "sidecar":
        from sidecar.main import run_sidecar

        return run_sidecar(args)
    if args.command == "control-plane":
        from control_plane.main import run_control_plane

        return run_control_plane(args)
    if args.command == "validate":
        from control_plane.main import run_validate

        return run_validate(args)
    if args.command == "status":
        from control_plane.status_cli import run_status

        return run_status(args)
    if args.command == "proxy-status":
        from control_plane.status_cli import run_proxy_status

        return run_proxy_status(args)
    if args.command == "proxy-config":
        from control_plane.proxy_config_cli import run_proxy_config

        return run_proxy_config(args)
    if args.command == "top":
        from pilotfish.top.run import run_top

        return run_top(args)
    if args.command == "iptables":
        from sidecar.listen.iptables import run_iptables

        return run_iptables(args)
    if args.command == "ca-root":
        from control_plane.ca.cli import run_ca_root

        return run_ca_root(args)
    if args.command == "identity-agent":
        from sidecar.security.agent import run_identity_agent

        return run_identity_agent(args)
    if args.command == "inject":
        from control_plane.kube.inject_cli import run_inject

        return run_inject(args)
    if args.command == "demo":
        from pilotfish.demo import run_demo

        return run_demo(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
