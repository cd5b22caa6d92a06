"""Runs the demo's phases while the load driver sends calls: applies each phase's change
through the control plane (the mesh file, or SIGTERM to an instance's sidecar), waits until
every sidecar has taken it, and measures the phase's window from the traffic and the
sidecars' metrics. What the measurements mean is decided in ``phases``.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pilotfish.demo.observe import (
    ControlPlaneStatus,
    MeshState,
    sum_stats,
    upstream_hosts,
    write_mesh,
)
from pilotfish.demo.phases import Acked, Observed, Phase, format_acked
from pilotfish.demo.processes import Child, Children, describe_exit
from pilotfish.demo.summary import OK, CallFinished, CallLog
from pilotfish.demo.topology import V1, Topology, mesh_file
from pilotfish.top.core import ALL_ROUTES, Scrape, window_rows
from pilotfish.top.run import Target, scrape_all

PROGRESS_INTERVAL = 1.0
# The control plane polls the mesh file every 200 ms; sidecars ack within a second or so.
ACK_TIMEOUT = 15.0
# Calls sent at the end of a window get this long to finish before the window is read.
SETTLE = 0.3
SCRAPE_TIMEOUT = 2.0
RETRY_STAT = re.compile(r"cluster\..+\.upstream_rq_retry")


class PhaseRunner:
    """Applies each phase's change while the load driver runs, and measures its window."""

    def __init__(
        self,
        topology: Topology,
        phase_seconds: float,
        mesh_path: Path,
        children: Children,
        status: ControlPlaneStatus,
        log: CallLog,
    ) -> None:
        self.topology = topology
        self.phase_seconds = phase_seconds
        self.mesh_path = mesh_path
        self.children = children
        self.status = status
        self.log = log
        self.expected_dead: set[str] = set()
        self.reported_dead: set[str] = set()
        self.targets = [Target(s.node_id, s.admin_address) for s in topology.sidecars]
        self.callers_of_quotes = [g.name for g in topology.greeters]
        self.sample_node = self.callers_of_quotes[0]

    def run_phase(self, number: int, phase: Phase) -> Observed:
        acked: list[Acked] = []
        drained: str | None = None
        removed_at = 0.0
        acked.append(self.apply_mesh(phase) if number > 1 else self.as_started())
        print("\n".join(format_acked(acked[-1])), flush=True)
        if phase.drain:
            drained, removed, removed_at = self.drain_one()
            acked.append(removed)
            print("\n".join(format_acked(removed)), flush=True)
        started = time.monotonic()
        before, _ = scrape_all(self.targets, SCRAPE_TIMEOUT)
        retries_before = self.retries()
        self.show_progress(started, started + self.phase_seconds)
        ended = time.monotonic()
        after, _ = scrape_all(self.targets, SCRAPE_TIMEOUT)
        retries = self.retries() - retries_before
        time.sleep(SETTLE)
        calls = [c for c in self.log.snapshot() if started <= c.started < ended]
        drain_exit = ""
        after_removal = 0
        if drained is not None:
            after_removal = sum(
                c.quotes == drained for c in self.log.snapshot() if c.started >= removed_at
            )
            child = self.child(f"{drained}-sidecar")
            code = child.exit_code()
            drain_exit = (
                "its sidecar is still draining" if code is None
                else f"its sidecar {describe_exit(code)}"
            )
        return Observed(
            phase=phase,
            acked=acked,
            calls=calls,
            seconds=ended - started,
            rows=window_rows(before, after, ["outbound"]),
            quotes_failed=self.quotes_failed(before, after),
            retries=retries,
            drained=drained,
            drained_after_removal=after_removal,
            drain_exit=drain_exit,
        )

    def quotes_failed(self, before: Mapping[str, Scrape], after: Mapping[str, Scrape]) -> int:
        """The quotes calls that failed in the window, as the greeters' sidecars counted them.

        Those sidecars call nothing but quotes, so every outbound failure of theirs is one,
        whatever name their metrics give the service."""
        callers = self.callers_of_quotes
        rows = window_rows(
            {n: before[n] for n in callers if n in before},
            {n: after[n] for n in callers if n in after},
            ["outbound"],
        )
        return round(
            sum(r.requests * (1 - (r.success_rate or 0.0)) for r in rows if r.route == ALL_ROUTES)
        )

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def retries(self) -> int:
        """Tries started again under a retry policy, by every sidecar still running."""
        total = 0
        for sidecar in self.topology.sidecars:
            if f"{sidecar.node_id}-sidecar" in self.expected_dead:
                continue
            with contextlib.suppress(OSError):
                total += sum_stats(sidecar.admin_address, RETRY_STAT)
        return total

    def live_nodes(self) -> set[str]:
        return {s.node_id for s in self.topology.sidecars} - {
            name.removesuffix("-sidecar") for name in self.expected_dead
        }

    def as_started(self) -> Acked:
        """The mesh file the control plane started with, as every sidecar runs it."""
        start = time.monotonic()
        nodes = self.live_nodes()
        state = self.status.wait(
            lambda state: self._all_in_sync(state, nodes), ACK_TIMEOUT, self._describe(nodes)
        )
        return self._acked("the mesh file as started", None, state, nodes, start)

    def apply_mesh(self, phase: Phase) -> Acked:
        before = self.status.state()
        start = time.monotonic()
        write_mesh(self.mesh_path, mesh_file(phase.policy))
        nodes = self.live_nodes()
        generation = before.generation if before is not None else 0

        def settled(state: MeshState) -> bool:
            return state.generation > generation and self._all_in_sync(state, nodes)

        state = self.status.wait(settled, ACK_TIMEOUT, self._describe(nodes))
        return self._acked("mesh file rewritten", before, state, nodes, start)

    def drain_one(self) -> tuple[str, Acked, float]:
        """SIGTERM to the sidecar of the last v1 quotes instance; returns once every caller of
        quotes has dropped its endpoint and every sidecar is in sync."""
        gone = self.topology.quotes_of(V1)[-1]
        before = self.status.state()
        start = time.monotonic()
        name = f"{gone.name}-sidecar"
        self.expected_dead.add(name)
        self.child(name).process.send_signal(signal.SIGTERM)
        nodes = self.live_nodes()
        callers = [g.sidecar.admin_address for g in self.topology.greeters]

        def eds_before(node: str) -> str:
            proxy = before.proxies.get(node) if before is not None else None
            return proxy.acked.get("EDS", "") if proxy is not None else ""

        was = {node: eds_before(node) for node in self.callers_of_quotes}

        def settled(state: MeshState) -> bool:
            # The status is read before the callers' endpoints: a caller can drop the host
            # between the two reads, so its new EDS ack must show in the status as well.
            acked = all(
                node in state.proxies and state.proxies[node].acked.get("EDS", "") != was[node]
                for node in self.callers_of_quotes
            )
            dropped = acked and all(
                (hosts := upstream_hosts(admin)) is not None
                and gone.sidecar.inbound_address not in hosts
                for admin in callers
            )
            return dropped and self._all_in_sync(state, nodes)

        state = self.status.wait(settled, ACK_TIMEOUT, self._describe(nodes))
        removed_at = time.monotonic()
        what = f"{gone.name} deregistered itself on SIGTERM; every caller dropped it"
        return gone.name, self._acked(what, before, state, nodes, start), removed_at

    @staticmethod
    def _all_in_sync(state: MeshState, nodes: set[str]) -> bool:
        return all(n in state.proxies and state.proxies[n].in_sync for n in nodes)

    @staticmethod
    def _describe(nodes: set[str]) -> Callable[[MeshState | None], str]:
        def describe(state: MeshState | None) -> str:
            if state is None:
                return "the control plane does not answer"
            late = sorted(n for n in nodes if n not in state.in_sync())
            text = f"not in sync after {ACK_TIMEOUT:.0f} s: {', '.join(late) or '-'}"
            if state.error:
                text += f"\nmesh file error: {state.error}"
            return text

        return describe

    def _acked(
        self,
        what: str,
        before: MeshState | None,
        after: MeshState,
        nodes: set[str],
        start: float,
    ) -> Acked:
        old = before.proxies.get(self.sample_node) if before is not None else None
        new = after.proxies.get(self.sample_node)
        changed: list[tuple[str, str, str]] = []
        if new is not None:
            for kind in ("LDS", "RDS", "CDS", "EDS"):
                was = old.acked.get(kind, "") if old is not None else ""
                now = new.acked.get(kind, "")
                if now and now != was:
                    changed.append((kind, was, now))
        return Acked(
            what=what,
            generation=after.generation,
            in_sync=len([n for n in nodes if n in after.in_sync()]),
            connected=len(nodes),
            seconds=time.monotonic() - start,
            sample_node=self.sample_node,
            changed=changed,
        )

    def show_progress(self, started: float, until: float) -> None:
        next_tick = started + PROGRESS_INTERVAL
        while True:
            now = time.monotonic()
            if now >= until:
                return
            time.sleep(max(0.0, min(next_tick, until) - now))
            if time.monotonic() >= next_tick:
                next_tick += PROGRESS_INTERVAL
                calls = [c for c in self.log.snapshot() if c.started >= started]
                print(_progress_line(time.monotonic() - started, calls), flush=True)
                self.report_dead_children()

    def report_dead_children(self) -> None:
        for child in self.children:
            code = child.exit_code()
            if code is None or child.name in self.reported_dead:
                continue
            self.reported_dead.add(child.name)
            if child.name in self.expected_dead:
                continue
            print(
                f"warning: {child.name} {describe_exit(code)}; last lines of its output:\n"
                f"{child.tail(5)}",
                file=sys.stderr,
                flush=True,
            )


def _progress_line(elapsed: float, calls: Sequence[CallFinished]) -> str:
    ok = sum(c.status == OK for c in calls)
    served: dict[str, int] = {}
    for c in calls:
        if c.status == OK and c.quotes:
            served[c.quotes] = served.get(c.quotes, 0) + 1
    quotes = "  ".join(f"{name} {n}" for name, n in sorted(served.items()))
    return (
        f"  [{elapsed:4.1f}s] {len(calls):4d} calls, {ok} ok, {len(calls) - ok} failed"
        f"   quotes: {quotes or '-'}"
    )
