"""``pilotfish top``: find the sidecars, scrape their metrics every N seconds, show the window.

Sidecars are given as admin addresses (``--admin``), or found through the control plane's
status service (each sidecar reports its admin address in its xDS node metadata), again at
every refresh, so instances that come and go are followed.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import grpc

from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from pilotfish.top.core import DIRECTIONS, Scrape, ScrapeError, parse_scrape, window_rows
from pilotfish.top.view import Frame, format_json, format_table

METRICS_PATH = "/stats/prometheus"
# Home, then clear to the end of the screen: the table is redrawn in place, no curses needed.
REDRAW = "\x1b[H\x1b[J"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DiscoveryFailed(Exception):
    """The control plane could not be asked, or named no sidecar to scrape."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # node id, or the admin address when given by hand
    admin: str  # HOST:PORT


def admin_targets(values: Sequence[str]) -> list[Target]:
    addresses = [
        a.strip().removeprefix("http://").rstrip("/") for value in values for a in value.split(",")
    ]
    return [Target(a, a) for a in addresses if a]


def control_plane_targets(address: str, timeout: float) -> list[Target]:
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = status_pb2_grpc.ControlPlaneStatusStub(channel)
        try:
            reply = stub.ListProxies(status_pb2.ListProxiesRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise DiscoveryFailed(
                f"control plane {address}: {exc.code().name}: {exc.details()}"
            ) from exc
    targets = [Target(p.node_id, p.admin_address) for p in reply.proxies if p.admin_address]
    if not targets:
        raise DiscoveryFailed(
            f"control plane {address}: no connected proxy reports an admin address"
        )
    return sorted(targets, key=lambda t: t.name)


def fetch_metrics(admin: str, timeout: float) -> str:
    with _NO_PROXY.open(f"http://{admin}{METRICS_PATH}", timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode("utf-8", errors="replace")


def scrape_all(
    targets: Sequence[Target], timeout: float, clock: Callable[[], float] = time.monotonic
) -> tuple[dict[str, Scrape], list[tuple[str, str]]]:
    """Every target at once; (scrapes by name, [(name, why) for those that failed])."""

    def one(target: Target) -> Scrape | str:
        try:
            text = fetch_metrics(target.admin, timeout)
            return parse_scrape(text, clock())
        except (OSError, urllib.error.URLError, ScrapeError) as exc:
            return f"{target.admin}: {exc}"

    scrapes: dict[str, Scrape] = {}
    failed: list[tuple[str, str]] = []
    if not targets:
        return scrapes, failed
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        for target, result in zip(targets, pool.map(one, targets), strict=True):
            if isinstance(result, Scrape):
                scrapes[target.name] = result
            else:
                failed.append((target.name, result))
    return scrapes, failed


def run_top(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    if args.interval <= 0:
        print("pilotfish top: --interval must be positive", file=sys.stderr)
        return 2
    directions = DIRECTIONS if args.direction == "all" else (args.direction,)
    live = not args.once and args.output == "table" and stream.isatty()

    def targets() -> list[Target]:
        if args.admin:
            return admin_targets(args.admin)
        return control_plane_targets(args.address, args.timeout)

    try:
        found = targets()
        if live:
            # Numbers need two scrapes: say so rather than show a blank screen meanwhile.
            stream.write(
                f"{REDRAW}pilotfish top: {len(found)} sidecars, first numbers in "
                f"{args.interval:g} s\n"
            )
            stream.flush()
        before, _ = scrape_all(found, args.timeout)
        while True:
            time.sleep(args.interval)
            after, failed = scrape_all(targets(), args.timeout)
            window = max(
                (after[n].at - before[n].at for n in after if n in before), default=args.interval
            )
            frame = Frame(
                rows=window_rows(before, after, directions),
                sidecars=sorted(after),
                unreachable=failed,
                window=window,
                clock=time.strftime("%H:%M:%S"),
            )
            text = format_json(frame) if args.output == "json" else format_table(frame)
            if live:
                stream.write(REDRAW + text + "\n(Ctrl-C quits)\n")
            else:
                stream.write(text if args.once or args.output == "json" else text + "\n")
            stream.flush()
            if args.once:
                return 0 if after else 1
            before = after
    except DiscoveryFailed as exc:
        print(f"pilotfish top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
