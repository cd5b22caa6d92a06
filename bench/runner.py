"""One benchmark: start the upstreams, then for each run and each target, start the target in
front of each upstream and measure every workload through it."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.procs import Pinning, StartError, idle_rss_bytes
from bench.targets import REPO, Running, Target, Upstream, start_upstream
from bench.workloads import Measurement, MeasurementError, Settings, Workload, measure


@dataclass(frozen=True, slots=True)
class Failure:
    error: str


Outcome = Measurement | Failure


@dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    cpus: int
    cpu_model: str
    kernel: str
    python: str
    tools: dict[str, str]
    load_average: str
    pilotfish_commit: str


@dataclass(slots=True, kw_only=True)
class BenchResult:
    started: datetime
    finished: datetime | None
    invocation: list[str]
    settings: Settings
    machine: Machine
    pinning: Pinning
    targets: list[Target]
    workloads: tuple[Workload, ...]
    outcomes: dict[tuple[str, str], list[Outcome]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    readiness: dict[str, str] = field(default_factory=dict)
    # RSS of each start of a proxy target, summed over its processes, once ready and before
    # any load: the target's name to one figure per start, in bytes.
    idle_rss: dict[str, list[int]] = field(default_factory=dict)

    def outcomes_for(self, target: str, workload: str) -> list[Outcome]:
        return self.outcomes.get((target, workload), [])


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def _git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" with uncommitted changes" if dirty else "")


def describe_machine() -> Machine:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import grpc

    return Machine(
        cpus=os.cpu_count() or 0,
        cpu_model=model,
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        tools={
            "h2load": _first_line(["/usr/bin/h2load", "--version"]),
            "nghttpd": _first_line(["/usr/sbin/nghttpd", "--version"]),
            "nghttpx": _first_line(["/usr/sbin/nghttpx", "--version"]),
            "grpcio": f"grpcio {grpc.__version__}",
        },
        pilotfish_commit=_git_commit(),
        load_average=" ".join(Path("/proc/loadavg").read_text().split()[:3]),
    )


class Upstreams:
    """The upstream servers, started once and started again if one has exited.

    Something outside the harness (a crash, or another process on a shared machine ending
    servers by name) must cost the affected measurements, not the rest of the run.
    """

    def __init__(self, pinning: Pinning, workdir: Path, result: BenchResult):
        self._pinning = pinning
        self._workdir = workdir
        self._result = result
        self._running: dict[str, Upstream] = {}

    def get(self, kind: str) -> Upstream:
        upstream = self._running.get(kind)
        if upstream is not None and upstream.proc.exited() is None:
            return upstream
        if upstream is not None:
            self._result.notes.append(
                f"The {kind} upstream was started again: {_one_line(upstream.proc.describe_exit())}"
            )
        self._running[kind] = start_upstream(kind, self._pinning, self._workdir)
        return self._running[kind]

    def serving(self, kind: str, port: int | None) -> bool:
        upstream = self._running.get(kind)
        return upstream is not None and upstream.port == port and upstream.proc.exited() is None

    def stop(self) -> None:
        for upstream in self._running.values():
            upstream.proc.stop()


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run_benchmark(
    *,
    settings: Settings,
    targets: Sequence[Target],
    workloads: Sequence[Workload],
    workdir: Path,
    invocation: list[str],
    log: Callable[[str], None],
) -> BenchResult:
    pinning = Pinning.for_this_machine()
    if pinning.load_cpu is not None:
        # The harness samples /proc while the proxy runs: keep it off the proxy's CPU.
        os.sched_setaffinity(0, {pinning.load_cpu})
    result = BenchResult(
        started=datetime.now(UTC),
        finished=None,
        invocation=invocation,
        settings=settings,
        machine=describe_machine(),
        pinning=pinning,
        targets=list(targets),
        workloads=tuple(workloads),
    )
    if pinning.proxy_cpu is None:
        result.notes.append("Fewer than 2 CPUs: nothing was pinned.")
    upstreams = Upstreams(pinning, workdir, result)
    try:
        for kind in dict.fromkeys(w.upstream for w in workloads):
            log(f"starting {kind} upstream")
            upstreams.get(kind)
        given_up: set[str] = set()
        for run in range(settings.runs):
            run_dir = workdir / f"run-{run + 1}"
            run_dir.mkdir()
            # Rotating the order spreads any drift (thermal, page cache) over all targets.
            shift = run % len(targets)
            for target in [*targets[shift:], *targets[:shift]]:
                if target.name in given_up:
                    continue
                for kind, group in itertools.groupby(workloads, key=lambda w: w.upstream):
                    group_run = _GroupRun(
                        result=result, run=run, target=target, kind=kind, upstreams=upstreams,
                        pinning=pinning, workdir=run_dir, log=log,
                    )
                    if not group_run.measure(list(group)):
                        given_up.add(target.name)
                        break
    finally:
        upstreams.stop()
    result.finished = datetime.now(UTC)
    return result


def _record(result: BenchResult, target: Target, workload: Workload, outcome: Outcome) -> None:
    result.outcomes.setdefault((target.name, workload.key), []).append(outcome)


@dataclass(slots=True, kw_only=True)
class _GroupRun:
    """One target in front of one upstream, measuring that upstream's workloads in turn."""

    result: BenchResult
    run: int
    target: Target
    kind: str
    upstreams: Upstreams
    pinning: Pinning
    workdir: Path
    log: Callable[[str], None]
    running: Running | None = None
    upstream_port: int | None = None

    @property
    def label(self) -> str:
        return f"run {self.run + 1}/{self.result.settings.runs} {self.target.name}"

    def measure(self, group: list[Workload]) -> bool:
        """Measures every workload of ``group``; False if the target never started."""
        try:
            for workload in group:
                try:
                    self._ensure_started()
                except StartError as exc:
                    self._did_not_start(exc)
                    return False
                outcome = self._measure_one(workload)
                if isinstance(outcome, Failure) and self._something_exited():
                    # The process is gone, so this failure says nothing about the load; note
                    # it, bring the processes back and measure once more.
                    self.result.notes.append(
                        f"{self.label} {workload.key}: a process exited during the measurement "
                        f"and it was repeated: {_one_line(outcome.error)}"
                    )
                    try:
                        self._ensure_started()
                    except StartError as exc:
                        self._did_not_start(exc)
                        return False
                    outcome = self._measure_one(workload)
                _record(self.result, self.target, workload, outcome)
        finally:
            if self.running is not None:
                self.running.stop()
        return True

    def _something_exited(self) -> bool:
        proc = self.running.proc if self.running is not None else None
        proxy_gone = proc is not None and proc.exited() is not None
        return proxy_gone or not self.upstreams.serving(self.kind, self.upstream_port)

    def _ensure_started(self) -> None:
        upstream = self.upstreams.get(self.kind)
        proc = self.running.proc if self.running is not None else None
        if (
            self.running is not None
            and upstream.port == self.upstream_port
            and (proc is None or proc.exited() is None)
        ):
            return
        if self.running is not None:
            if proc is not None and proc.exited() is not None:
                self.result.notes.append(
                    f"{self.label} was started again: {_one_line(proc.describe_exit())}"
                )
            self.running.stop()
            self.running = None
        self.running = self.target.start(upstream.port, self.pinning, self.workdir)
        self.upstream_port = upstream.port
        if self.target.is_proxy:
            self.result.readiness.setdefault(self.target.name, self.running.readiness)
            if self.running.proc is not None:
                idle = idle_rss_bytes(self.running.proc.pid)
                self.result.idle_rss.setdefault(self.target.name, []).append(idle)

    def _did_not_start(self, exc: StartError) -> None:
        self.log(f"{self.label}: did not start: {exc}")
        self.result.notes.append(
            f"**{self.target.name}** did not start (run {self.run + 1}, {self.kind} upstream), "
            f"so it was not tried again:\n\n```\n{exc}\n```"
        )
        failure = Failure(f"did not start: {str(exc).splitlines()[0]}")
        for workload in self.result.workloads:
            if len(self.result.outcomes_for(self.target.name, workload.key)) <= self.run:
                _record(self.result, self.target, workload, failure)

    def _measure_one(self, workload: Workload) -> Outcome:
        assert self.running is not None
        running, settings = self.running, self.result.settings
        pid = running.proc.pid if running.proc is not None else None
        best: Measurement | None = None
        for attempt in range(1 + settings.noise_retries):
            try:
                m = measure(workload, running.port, pid, settings, self.pinning)
            except MeasurementError as exc:
                self.log(f"{self.label} {workload.key}: FAILED: {exc}")
                if running.proc is not None and running.proc.exited() is not None:
                    return Failure(f"{exc}; {running.proc.describe_exit()}")
                return Failure(str(exc))
            noise = m.others_on_proxy_core_pct
            cpu = m.proxy_cpu_us_per_request
            self.log(
                f"{self.label} {workload.key}: {m.requests_per_s:,.0f} req/s, "
                f"p50 {m.p50_us:,.0f} µs, p99 {m.p99_us:,.0f} µs"
                + (f", proxy {cpu:.1f} µs CPU/req" if cpu is not None else "")
                + (f", others on proxy core {noise:.0f}%" if noise is not None else "")
            )
            # Keep the least disturbed attempt: chosen by the noise, never by the result.
            if best is None or (noise or 0.0) < (best.others_on_proxy_core_pct or 0.0):
                best = m
            # Without a proxy nothing measured runs on the proxy's core: others there (the
            # scheduler moves unpinned work onto the idle core) do not disturb a direct run.
            if not self.target.is_proxy or (noise or 0.0) <= settings.noise_limit_pct:
                break
            if attempt < settings.noise_retries:
                self.log(f"{self.label} {workload.key}: proxy core disturbed, measuring again")
        assert best is not None
        return best


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
