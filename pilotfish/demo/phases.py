"""The demo's phases: what each one changes through the control plane, what it should show in
the traffic, and how that is judged and printed. Pure: the runner measures, this decides.

Each phase is judged from the calls the load driver made in the phase's window (which quotes
instance answered, and how the call ended) and from the sidecars' own metrics over the same
window (as ``pilotfish top`` computes them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pilotfish.demo.summary import OK, CallFinished, percentile
from pilotfish.demo.topology import QuotesPolicy, Topology
from pilotfish.top.core import ALL_ROUTES, Row

CANARY_PERCENT = 10
ABORT_PERCENT = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    title: str
    policy: QuotesPolicy
    drain: bool = False  # stop the last v1 quotes instance's sidecar (SIGTERM) in this phase


PHASES = (
    Phase(
        title="baseline: quotes calls go round robin over the v1 instances",
        policy=QuotesPolicy(),
    ),
    Phase(
        title=f"canary: a route split sends {CANARY_PERCENT}% of quotes calls to v2",
        policy=QuotesPolicy(canary_percent=CANARY_PERCENT),
    ),
    Phase(
        title=f"fault: the greeters' sidecars abort {ABORT_PERCENT}% of quotes calls "
        "(UNAVAILABLE); the sidecars' retries absorb them",
        policy=QuotesPolicy(canary_percent=CANARY_PERCENT, abort_percent=ABORT_PERCENT),
    ),
    Phase(
        title="drain: the fault is lifted, and a v1 quotes instance is stopped with SIGTERM "
        "(it deregisters, waits until every caller has dropped it, then drains)",
        policy=QuotesPolicy(canary_percent=CANARY_PERCENT),
        drain=True,
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acked:
    """A config change as the control plane saw the sidecars take it."""

    what: str  # "mesh file rewritten", "quotes-2 deregistered"...
    generation: int  # the control plane's mesh generation
    in_sync: int  # sidecars that acked what the control plane has now
    connected: int
    seconds: float  # from the change to the last ack
    # One caller's acked version per xDS type (CDS, EDS...) that changed with this change.
    sample_node: str = ""
    changed: Sequence[tuple[str, str, str]] = ()  # (type, before, now)


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    phase: Phase
    acked: Sequence[Acked]
    calls: Sequence[CallFinished]  # sent in the window
    seconds: float  # the window's length
    rows: Sequence[Row] = ()  # the sidecars' outbound metrics over the window
    retries: int = 0  # tries the sidecars started again (all of them, every cluster)
    quotes_failed: int = 0  # quotes calls that failed, as the greeters' sidecars counted them
    drained: str | None = None  # the quotes instance stopped in this phase
    drained_after_removal: int = 0  # its calls sent after every caller had dropped it
    drain_exit: str = ""  # how its sidecar ended, when it did within the window


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    text: str


@dataclass(slots=True)
class Shares:
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, name: str) -> float:
        return self.counts[name] / self.total if self.total else 0.0


def quotes_shares(calls: Sequence[CallFinished]) -> Shares:
    return Shares(Counter(c.quotes or "?" for c in calls if c.status == OK))


def judge(observed: Observed, topology: Topology) -> Verdict:
    """Did the phase show its effect in the traffic?"""
    calls = observed.calls
    failed = sum(c.status != OK for c in calls)
    shares = quotes_shares(calls)
    v1 = [q.name for q in topology.quotes if q.version == "v1"]
    v2 = [q.name for q in topology.quotes if q.version == "v2"]
    if not calls:
        return Verdict(False, "no calls were made in this phase")
    policy = observed.phase.policy
    if observed.phase.drain:
        gone = observed.drained or "?"
        if failed:
            return Verdict(False, f"{failed} calls failed while {gone} was drained")
        if observed.drained_after_removal:
            return Verdict(
                False,
                f"{gone} still got {observed.drained_after_removal} calls after every caller "
                "had acked its removal",
            )
        return Verdict(
            True,
            f"{gone} left without a failed call; it got no call once the callers had dropped "
            "it",
        )
    if policy.abort_percent:
        injected = observed.quotes_failed
        if injected == 0:
            return Verdict(False, "no quotes call failed: the fault was not injected")
        if observed.retries == 0:
            return Verdict(False, f"{injected} quotes calls were aborted, but none was retried")
        if failed >= injected:
            return Verdict(False, f"the retries absorbed none of the {injected} aborts")
        return Verdict(
            True,
            f"{injected} quotes calls aborted, {observed.retries} tries repeated by the "
            f"sidecars: {failed} of {len(calls)} calls failed for the client",
        )
    # Failed calls are shown with the phase; round robin and the split are judged on the rest.
    if not shares.total:
        return Verdict(False, "no call succeeded")
    if policy.canary_percent:
        canary = sum(shares.counts[name] for name in v2)
        share = 100.0 * canary / shares.total
        # Binomial noise over a few hundred calls stays well inside these bounds.
        low, high = policy.canary_percent / 3, policy.canary_percent * 2
        return Verdict(
            low <= share <= high,
            f"v2 answered {share:.1f}% of the quotes calls (the split asks "
            f"{policy.canary_percent}%)",
        )
    # Round robin over the v1 instances: each near an equal share, v2 none.
    if any(shares.counts[name] for name in v2):
        return Verdict(False, "v2 answered calls, though no route sends it any")
    even = 1.0 / len(v1)
    spread = [shares.share(name) for name in v1]
    balanced = all(0.5 * even <= s <= 1.5 * even for s in spread)
    text = "the v1 instances shared the calls evenly" if balanced else "uneven round robin"
    return Verdict(balanced, f"{text}: " + ", ".join(f"{s * 100:.0f}%" for s in spread))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def format_acked(acked: Acked) -> list[str]:
    lines = [
        f"  control plane: {acked.what}; mesh generation {acked.generation}, acked by "
        f"{acked.in_sync}/{acked.connected} sidecars within {acked.seconds:.1f} s"
    ]
    if acked.changed:
        versions = ", ".join(
            f"{t} {now[:8]}" + (f" (was {before[:8]})" if before else "")
            for t, before, now in acked.changed
        )
        lines.append(f"    {acked.sample_node} acked {versions}")
    return lines


def format_phase(observed: Observed, topology: Topology, verdict: Verdict) -> str:
    """What the phase measured, and its verdict (its title and acks are printed as they come)."""
    calls = observed.calls
    ok = sum(c.status == OK for c in calls)
    lines = []
    if observed.drain_exit:
        lines.append(f"  {observed.drained}: {observed.drain_exit}")
    latencies = sorted(c.latency for c in calls)
    line = f"  traffic: {len(calls)} calls in {observed.seconds:.1f} s, {ok} ok"
    if latencies:
        line += (
            f" ({100.0 * ok / len(calls):.1f}%), p50 {_ms(percentile(latencies, 50))}, "
            f"p99 {_ms(percentile(latencies, 99))}"
        )
    lines.append(line)
    failures = Counter(c.status for c in calls if c.status != OK)
    if failures:
        lines.append("  failed: " + ", ".join(f"{s} {n}" for s, n in failures.most_common()))
    shares = quotes_shares(calls)
    versions = {q.name: q.version for q in topology.quotes}
    if shares.total:
        lines.append(
            "  quotes answered by: "
            + "  ".join(
                f"{name} ({versions.get(name, '?')}) {shares.counts[name]} "
                f"{shares.share(name) * 100:.1f}%"
                for name in sorted(shares.counts)
            )
        )
    metrics = [r for r in observed.rows if r.route == ALL_ROUTES]
    if metrics:
        lines.append(
            "  sidecars' metrics (outbound): "
            + "; ".join(
                f"{r.service} {(r.success_rate or 0) * 100:.1f}% ok, {r.rps:.0f}/s, "
                f"p99 {_ms(r.p99)}"
                for r in metrics
            )
        )
    if observed.retries:
        lines.append(f"  the sidecars repeated {observed.retries} tries (retries)")
    lines.append(f"  effect: {verdict.text}: {'OK' if verdict.ok else 'NOT SHOWN'}")
    return "\n".join(lines)
