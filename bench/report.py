"""Turning a ``BenchResult`` into docs/benchmarks.md (and a raw JSON record). No I/O here."""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.h2load import h2load_argv
from bench.procs import IDLE_SETTLE_S
from bench.runner import BenchResult, Failure
from bench.stats import median_or_none
from bench.targets import (
    REPO,
    Pilotfish,
    PilotfishTcp,
    Target,
    grpc_server_argv,
    nghttpd_argv,
    pilotfish_bootstrap,
    pilotfish_tcp_bootstrap,
)
from bench.workloads import GrpcWorkload, H2loadWorkload, Measurement, Workload, grpc_client_argv

DIRECT = "direct"
NGHTTPX = "nghttpx"


@dataclass(frozen=True, slots=True, kw_only=True)
class Medians:
    runs: int
    runs_ok: int
    requests_per_s: float | None = None
    mb_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_request: float | None = None
    rss_mb: float | None = None
    others_pct: float | None = None
    failure: str | None = None


PROFILES = Path(__file__).with_name("profiles.md")
CONTROL_PLANE = Path(__file__).with_name("control_plane.md")
OVERLOAD = Path(__file__).with_name("overload.md")
OTLP_EXPORT = Path(__file__).with_name("otlp_export.md")
MEMORY = Path(__file__).with_name("memory.md")
HOSTILE = Path(__file__).with_name("hostile.md")


def medians(result: BenchResult, target: str, workload: str) -> Medians:
    outcomes = result.outcomes_for(target, workload)
    ok = [o for o in outcomes if isinstance(o, Measurement)]
    failures = [o.error for o in outcomes if isinstance(o, Failure)]
    return Medians(
        runs=len(outcomes),
        runs_ok=len(ok),
        requests_per_s=median_or_none(m.requests_per_s for m in ok),
        mb_per_s=median_or_none(m.mb_per_s for m in ok),
        p50_us=median_or_none(m.p50_us for m in ok),
        p99_us=median_or_none(m.p99_us for m in ok),
        cpu_us_per_request=median_or_none(m.proxy_cpu_us_per_request for m in ok),
        rss_mb=median_or_none(m.proxy_rss_mb for m in ok),
        others_pct=median_or_none(m.others_on_proxy_core_pct for m in ok),
        failure=failures[0] if failures else None,
    )


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "—"
    return f"{value / base:.2f}x"


def _cpu_ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.1f}x"


def _added(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "—"
    return f"{value - base:+,.0f}"


def idle_rss_mb(result: BenchResult, target: str) -> float | None:
    """Median idle RSS over the target's starts, in MiB (as the peak figures)."""
    idle = median_or_none(result.idle_rss.get(target, ()))
    return idle / 2**20 if idle is not None else None


def _workload_table(result: BenchResult, workload: Workload) -> list[str]:
    direct = medians(result, DIRECT, workload.key)
    nghttpx = medians(result, NGHTTPX, workload.key)
    header = ["target", "req/s"]
    if workload.reports_mb_per_s:
        header.append("MB/s")
    header += ["p50 µs", "p99 µs"]
    if workload.at_concurrency_1:
        header.append("added p50 per hop µs")
    header += [
        "proxy CPU µs/req", "proxy peak RSS MB", "req/s vs direct", "req/s vs nghttpx",
        "CPU/req vs nghttpx", "others on proxy core %", "runs ok",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures: list[str] = []
    for target in result.targets:
        m = medians(result, target.name, workload.key)
        if m.runs == 0:
            continue
        if m.runs_ok == 0:
            failures.append(f"- {target.name}: {m.failure}")
            cells = [target.name, "failed"] + ["—"] * (len(header) - 3) + [f"0/{m.runs}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        row = [target.name, _num(m.requests_per_s)]
        if workload.reports_mb_per_s:
            row.append(_num(m.mb_per_s))
        row += [_num(m.p50_us), _num(m.p99_us)]
        if workload.at_concurrency_1:
            row.append(_added(m.p50_us, direct.p50_us) if target.is_proxy else "—")
        row += [
            _num(m.cpu_us_per_request, 1),
            _num(m.rss_mb, 1),
            _ratio(m.requests_per_s, direct.requests_per_s),
            _ratio(m.requests_per_s, nghttpx.requests_per_s),
            _ratio(m.cpu_us_per_request, nghttpx.cpu_us_per_request),
            _num(m.others_pct),
            f"{m.runs_ok}/{m.runs}",
        ]
        lines.append("| " + " | ".join(row) + " |")
        if m.failure is not None:
            failures.append(f"- {target.name} (some runs): {m.failure}")
    return lines + (["", *failures] if failures else [])


def _fixed_rate(workload: Workload) -> bool:
    return isinstance(workload, H2loadWorkload) and workload.rate_per_client is not None


def _at_a_glance(result: BenchResult) -> list[str]:
    by_key = {w.key: w for w in result.workloads}
    latency = [w for w in result.workloads if w.at_concurrency_1]
    fixed_rate = [w for w in result.workloads if _fixed_rate(w)]
    throughput = [
        w for w in result.workloads if not w.at_concurrency_1 and not _fixed_rate(w)
    ]
    # CPU per request is read at full load and at the paced rates above one request at a time.
    cpu = throughput + [
        w for w in fixed_rate if isinstance(w, H2loadWorkload) and w.clients > 1
    ]
    header = ["proxy"]
    header += [f"added p50 per hop µs, {w.key}" for w in latency]
    header += [f"added p99 per hop µs, {w.key}" for w in fixed_rate]
    header += [f"CPU µs/req, {w.key}" for w in cpu]
    header += [f"CPU/req vs nghttpx, {w.key}" for w in cpu]
    header += [f"req/s vs nghttpx, {w.key}" for w in throughput]
    header += ["idle RSS MB", "max peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target in result.targets:
        if not target.is_proxy:
            continue
        row = [target.name]
        row += [
            _added(
                medians(result, target.name, w.key).p50_us, medians(result, DIRECT, w.key).p50_us
            )
            for w in latency
        ]
        row += [
            _added(
                medians(result, target.name, w.key).p99_us, medians(result, DIRECT, w.key).p99_us
            )
            for w in fixed_rate
        ]
        row += [_num(medians(result, target.name, w.key).cpu_us_per_request, 1) for w in cpu]
        row += [
            _cpu_ratio(
                medians(result, target.name, w.key).cpu_us_per_request,
                medians(result, NGHTTPX, w.key).cpu_us_per_request,
            )
            for w in cpu
        ]
        row += [
            _ratio(
                medians(result, target.name, w.key).requests_per_s,
                medians(result, NGHTTPX, w.key).requests_per_s,
            )
            for w in throughput
        ]
        row.append(_num(idle_rss_mb(result, target.name), 1))
        rss = [medians(result, target.name, k).rss_mb for k in by_key]
        present = [r for r in rss if r is not None]
        row.append(_num(max(present), 1) if present else "—")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _passthrough_vs_nghttpx(result: BenchResult) -> list[str]:
    """The L4 target: Pilotfish relaying the same HTTP/2 bytes, against nghttpx at L7."""
    tcp = PilotfishTcp.name
    if not any(t.name == tcp for t in result.targets):
        return []
    header = [
        "workload", f"{tcp} req/s", "nghttpx req/s", "req/s vs nghttpx",
        f"{tcp} CPU µs/req", "nghttpx CPU µs/req",
    ]
    lines = [
        "",
        f"TCP passthrough (`{tcp}`: no HTTP parsing, no L7 policy) against nghttpx carrying "
        "the same HTTP/2 traffic; the target is at least 0.50x nghttpx's request rate:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for w in result.workloads:
        m, ng = medians(result, tcp, w.key), medians(result, NGHTTPX, w.key)
        if m.runs == 0:
            continue
        row = [
            w.key, _num(m.requests_per_s), _num(ng.requests_per_s),
            _ratio(m.requests_per_s, ng.requests_per_s),
            _num(m.cpu_us_per_request, 1), _num(ng.cpu_us_per_request, 1),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _noise_line(result: BenchResult) -> str:
    limit = result.settings.noise_limit_pct
    noise = [
        o.others_on_proxy_core_pct
        for (target, _), runs in result.outcomes.items()
        if target != DIRECT
        for o in runs
        if isinstance(o, Measurement) and o.others_on_proxy_core_pct is not None
    ]
    if not noise:
        return "- Noise on the proxy's core: not measured."
    above = sum(1 for n in noise if n > limit)
    rough = above * 4 > len(noise)
    return (
        f"- Noise: other processes kept the proxy's core busy a median "
        f"{statistics.median(noise):.0f}% of each measured run; {above} of {len(noise)} "
        f"measurements through a proxy were above the {limit:g}% limit"
        + (": treat this run's figures as rough." if rough else ".")
    )


def _shell(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return text.replace(str(REPO) + "/", "")


def _commands(result: BenchResult) -> list[str]:
    s = result.settings
    load = result.pinning.load()
    proxy = result.pinning.proxy()
    out = [
        "Ports are chosen at run time; they appear here as `UPSTREAM_PORT`, `PROXY_PORT` and "
        "`ADMIN_PORT`. Commands run from the repository root.",
        "",
        "```sh",
        "# the benchmark itself",
        _shell(result.invocation),
        "# upstreams (DOCROOT holds `small`, 128 bytes, and `64k`, 65,536 bytes)",
        _shell(load + nghttpd_argv("DOCROOT", "UPSTREAM_PORT")),
        _shell(load + grpc_server_argv("UPSTREAM_PORT")),
        "# proxies",
    ]
    for target in result.targets:
        config = "BOOTSTRAP-TCP.yaml" if isinstance(target, PilotfishTcp) else "BOOTSTRAP.yaml"
        argv = target.command("UPSTREAM_PORT", "PROXY_PORT", config)
        if argv:
            out.append(_shell(proxy + argv))
    out.append("# load: N comes from probe runs (the same h2load command without --log-file)")
    out.append(
        f"# that size the measured run to about {s.duration_s:g} s, at most {s.max_requests:,}"
    )
    for w in result.workloads:
        if isinstance(w, H2loadWorkload):
            argv = h2load_argv(
                url=f"http://127.0.0.1:PROXY_PORT{w.path}", requests="N", clients=w.clients,
                streams=w.streams, log_file="LOG.tsv", rate_per_client=w.rate_per_client,
            )
        else:
            assert isinstance(w, GrpcWorkload)
            argv = grpc_client_argv(
                "PROXY_PORT", w.in_flight, f"{s.duration_s:g}", str(s.max_requests),
                str(s.grpc_warmup_calls), w.payload_bytes,
            )
        out.append(_shell(load + argv))
    out.append("```")
    if any(isinstance(t, Pilotfish) for t in result.targets):
        out += [
            "",
            "`BOOTSTRAP.yaml` for Pilotfish:",
            "",
            "```yaml",
            pilotfish_bootstrap("ADMIN_PORT", "PROXY_PORT", "UPSTREAM_PORT").rstrip(),
            "```",
        ]
    if any(isinstance(t, PilotfishTcp) for t in result.targets):
        out += [
            "",
            f"`BOOTSTRAP-TCP.yaml` for {PilotfishTcp.name}:",
            "",
            "```yaml",
            pilotfish_tcp_bootstrap("ADMIN_PORT", "PROXY_PORT", "UPSTREAM_PORT").rstrip(),
            "```",
        ]
    return out


def _target_list(targets: Sequence[Target]) -> str:
    return ", ".join(t.name for t in targets)


def render_markdown(result: BenchResult) -> str:
    m = result.machine
    s = result.settings
    took = (result.finished - result.started).total_seconds() if result.finished else 0.0
    pin = result.pinning
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (see `bench/README.md`); rerun it rather than editing "
        "this file.",
        "",
        f"- Date: {result.started:%Y-%m-%d %H:%M} UTC (the run took {took / 60:.1f} min)",
        f"- Machine: {m.cpus} CPUs, {m.cpu_model}, {m.kernel}, Python {m.python}",
        "- Tools: " + ", ".join(m.tools.values()),
        f"- Load average when the run started: {m.load_average} (other work on the machine "
        "shows up as noise)",
        f"- Pilotfish commit: {m.pilotfish_commit}",
        f"- Targets: {_target_list(result.targets)}",
        f"- {s.runs} run(s); every figure is the median over runs, taken figure by figure. "
        f"Each measured load run lasts about {s.duration_s:g} s, after probe runs that size it "
        "and warm the target up.",
        "",
        "## Setup",
        "",
        f"- Pinning: the load generator, both upstreams and the harness run on CPU "
        f"{pin.load_cpu}; the proxy under test runs on CPU {pin.proxy_cpu}"
        " (every Pilotfish worker and every nghttpx process, so x2 workers share one core). "
        "This machine has 2 cores, so the load side shares one: the *direct* rows measure "
        "h2load (or the gRPC client) and the upstream competing for CPU 0, not a network limit, "
        "and a proxy close to direct is limited by the load side, not by itself.",
        "- Upstreams: nghttpd (cleartext h2, one thread) for h2load; a grpcio thread-pool "
        "server with a generic raw-bytes echo handler for gRPC, in its own process. The gRPC "
        "client and server are Python and share CPU 0, so gRPC throughput is bounded by them "
        "at a few thousand calls/s: a proxy that matches direct there is not the bottleneck, "
        "and its CPU per call is the figure to read.",
        "- nghttpx: one worker, cleartext h2 frontend, h2 backend, otherwise defaults. Its "
        "default backend stream window is 65,535 bytes, one byte short of a 64 KiB body, so "
        "each 64 KiB response waits for a WINDOW_UPDATE round trip to nghttpd: its `h2-64k` "
        "row shows that default, not nghttpx's best (raising `--backend-http2-window-size` "
        "lifts it several-fold).",
        "- Pilotfish: `pilotfish sidecar` with the bootstrap below; one process, and "
        "`--concurrency 2` where it starts. `pilotfish-2w-all-cpus` is `--concurrency 2` "
        "allowed on both cores (`taskset -c 0-1`), so each worker can have a core, the one "
        "on CPU 0 sharing it with the load side: compare its req/s with `pilotfish` for how "
        "throughput grows with workers. Its *others on proxy core* figure covers CPU 1 "
        "only.",
        *(
            [
                f"- {PilotfishTcp.name}: `pilotfish sidecar` with a listener in `mode: tcp` "
                "(`BOOTSTRAP-TCP.yaml` below): each connection's bytes are relayed to the "
                "upstream unparsed (splice(2) on Linux), so the h2 session is between the load "
                "generator and the upstream and no L7 policy applies."
            ]
            if any(isinstance(t, PilotfishTcp) for t in result.targets)
            else []
        ),
        *(
            [
                "- Codecs: `pilotfish` uses the default HTTP/2 codec (ngh2, libnghttp2, when it "
                "is installed); a `-python-codec` target is the same sidecar on Pilotfish's "
                "pure-Python codec (`PILOTFISH_H2_CODEC=python`)."
            ]
            if any(isinstance(t, Pilotfish) and t.codec is not None for t in result.targets)
            else []
        ),
        *(f"- {name} was taken as ready when its {how}." for name, how in result.readiness.items()),
        _noise_line(result),
        "",
        "What the columns mean:",
        "",
        "- **req/s**: 2xx responses (h2load) or successful calls (gRPC) per second of the "
        "measured run. Any non-2xx response or failed call fails that measurement. "
        "**MB/s**: response body bytes (10⁶ bytes) per second.",
        "- **p50 / p99**: per-request latency, from request start to the end of the response "
        "(h2load `--log-file`; per call in the gRPC client), nearest-rank percentiles.",
        "- **added p50 per hop**: the target's p50 minus direct's p50, at concurrency 1.",
        "- **added p99 per hop**: the target's p99 minus direct's p99, at the same fixed rate"
        " (`h2-small-1k`: 1,000 requests/s; `h2-small-5k`: 5,000 requests/s).",
        "- **proxy CPU µs/req**: utime+stime growth in `/proc/<pid>/stat` over the measured "
        "run, summed over the proxy's process tree, divided by the requests completed.",
        "- **proxy peak RSS**: the largest sum of RSS over the proxy's processes, sampled every "
        "100 ms during the measured run. **idle RSS**: the same sum taken once per start of "
        f"the proxy, {IDLE_SETTLE_S:g} s after it was ready and before any load (median over "
        "starts).",
        "- **vs direct / vs nghttpx**: ratios of req/s; **CPU/req vs nghttpx**: ratio of "
        "proxy CPU per request.",
        "- **others on proxy core**: how busy the proxy's core was with anything but the "
        "proxy (other processes, hypervisor steal) during the measured run, from /proc/stat. "
        + (
            f"A measurement above {s.noise_limit_pct:g}% is repeated up to {s.noise_retries} "
            "more time(s) and the least disturbed attempt kept; "
            if s.noise_retries
            else "Disturbed measurements were not repeated in this run; "
        )
        + "a figure still high means that row was disturbed. In *direct* rows the figure only "
        "says how busy the machine was: nothing of a direct run uses that core, and the "
        "scheduler moves other unpinned work onto it.",
        "",
        "## At a glance",
        "",
        *_at_a_glance(result),
        *_passthrough_vs_nghttpx(result),
        "",
        "## Results",
    ]
    for w in result.workloads:
        lines += ["", f"### {w.title} (`{w.key}`)", "", *_workload_table(result, w)]
    if result.notes:
        lines += ["", "## Notes", ""]
        for note in result.notes:
            # Multi-line notes (a failure with its log) stand as paragraphs, the rest as items.
            lines += ["", note, ""] if "\n" in note else [f"- {note}"]
    lines += ["", "## Commands", "", *_commands(result), ""]
    for extra in (CONTROL_PLANE, OVERLOAD, PROFILES, OTLP_EXPORT, MEMORY, HOSTILE):
        # Measured by their own commands (named inside), kept beside the harness.
        if extra.exists():
            lines += ["", extra.read_text().strip(), ""]
    return "\n".join(lines)


def raw_json(result: BenchResult) -> str:
    def encode(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return str(value)

    document = {
        "started": result.started.isoformat(),
        "finished": result.finished.isoformat() if result.finished else None,
        "invocation": result.invocation,
        "settings": result.settings,
        "machine": result.machine,
        "pinning": result.pinning,
        "outcomes": [
            {"target": target, "workload": workload, "runs": runs}
            for (target, workload), runs in result.outcomes.items()
        ],
        "notes": result.notes,
        "idle_rss_bytes": result.idle_rss,
    }
    return json.dumps(document, default=encode, indent=2, ensure_ascii=False)
