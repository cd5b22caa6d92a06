"""``python -m bench.control_plane_scale``: how fast a generated mesh reaches many proxies, and
what it costs the control plane.

One run: write a generated mesh file; start ``python -m pilotfish control-plane`` as a child
process; connect the proxies (``bench.ads_clients``, in ``--client-processes`` processes) and time
until every one holds a complete, ACKed config; then edit one service's endpoints, and then every
service, and time until each proxy that sees the change has ACKed it. The control plane's RSS
and CPU come from psutil, pushes from its ``/metrics``, bytes from what the clients received.
Figures are medians over ``--runs`` runs, each with a fresh control plane. Everything is on
127.0.0.1 and every wait is bounded.

``measure(...)`` returns the figures and ``render_markdown(...)`` the table, for a larger report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.procs import Spawned, free_port, tcp_accepts

REPO = Path(__file__).resolve().parent.parent
VIEWS = ("depends_on", "all")


class ScaleError(RuntimeError):
    """A run could not finish within its bounds; the message says where it stopped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    services: int
    proxies: int
    # "depends_on": most services list a few dependencies, ``open_fraction`` of them none (so
    # their proxies see every service); "all": no service lists any, every proxy sees all.
    view: str
    open_fraction: float = 0.1
    seed: int = 1

    @property
    def label(self) -> str:
        return f"N={self.services} M={self.proxies} {self.view}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    start_s: float = 900.0
    push_s: float = 300.0
    edit_s: float = 900.0
    max_rss_mb: float = 8000.0


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------- the generated mesh


def generate_mesh(scenario: Scenario) -> dict[str, Any]:
    """A mesh document: 2 or 3 endpoints per service, a route or two, a few tcp services, some
    canary splits, and (view "depends_on") dependencies skewed towards a few popular services."""
    rng = random.Random(scenario.seed)
    names = [f"svc-{i:04d}" for i in range(scenario.services)]
    protocols = rng.choices(("grpc", "http2", "http1", "tcp"), (70, 10, 15, 5), k=len(names))
    http = [n for n, p in zip(names, protocols, strict=True) if p != "tcp"]
    popular = names[: max(1, len(names) // 50)]
    services: dict[str, Any] = {}
    for i, (name, protocol) in enumerate(zip(names, protocols, strict=True)):
        service: dict[str, Any] = {
            "protocol": protocol,
            "endpoints": [f"127.0.0.1:{20000 + 3 * i + j}" for j in range(rng.choice((2, 3)))],
        }
        if protocol != "tcp":
            service["port"] = 8080
            service["routes"] = _routes(rng, name, http)
        if scenario.view == "depends_on" and rng.random() >= scenario.open_fraction:
            others = [n for n in names if n != name]
            deps = {rng.choice(popular), *rng.sample(others, rng.randint(0, 4))} - {name}
            service["depends_on"] = sorted(deps)
        services[name] = service
    return {"services": services}


def _routes(rng: random.Random, name: str, http: Sequence[str]) -> list[dict[str, Any]]:
    main: dict[str, Any] = {"name": "main", "match": {"prefix": "/"}, "timeout": "5s"}
    roll = rng.random()
    if roll < 0.1:
        canary = rng.choice(http)
        if canary != name:
            main["split"] = {name: 90, canary: 10}
    if roll < 0.5:
        debug = {"name": "debug", "match": {"prefix": "/debug/", "headers": [
            {"name": "x-debug", "exact": "1"}]}, "timeout": "0s"}
        return [debug, main]
    return [main]


def visible_services(mesh: dict[str, Any], service: str) -> frozenset[str]:
    """The services a proxy of ``service`` sees (docs/mesh-reference.md): its ``depends_on``, or
    all, plus whatever their routes send to. Computed here so the benchmark checks the plane."""
    services: dict[str, Any] = mesh["services"]
    deps = services.get(service, {}).get("depends_on")
    seen: set[str] = set()
    pending = list(services if deps is None else deps)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for route in services[name].get("routes", ()):
            pending.extend(route.get("split", {}) or [route.get("cluster", name)])
    return frozenset(seen)


def proxy_services(mesh: dict[str, Any], proxies: int) -> list[str]:
    """The service each proxy fronts: spread evenly over the mesh, wrapping if M > N."""
    names = sorted(mesh["services"])
    step = max(1, len(names) // proxies)
    return [names[(i * step) % len(names)] for i in range(proxies)]


def with_endpoints_moved(mesh: dict[str, Any], which: Sequence[str]) -> dict[str, Any]:
    """A copy where each named service's endpoints moved port (an instance replaced)."""
    edited: dict[str, Any] = json.loads(json.dumps(mesh))
    for name in which:
        service = edited["services"][name]
        service["endpoints"] = [_bump_port(e) for e in service["endpoints"]]
    return edited


def _bump_port(endpoint: str) -> str:
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + 10000}"


def mesh_text(mesh: dict[str, Any]) -> str:
    # libyaml when present: the pure-Python dumper takes seconds for 1,000 services.
    dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(mesh, Dumper=dumper, sort_keys=False)


def write_mesh(path: Path, text: str) -> None:
    """Replace the file atomically, so the control plane's poll never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- measuring one run


@dataclass(slots=True, kw_only=True)
class RunFigures:
    """Filled phase by phase: a run that fails keeps what it measured before it failed."""

    startup_s: float | None = None  # spawn → serving (the mesh is loaded, every view built)
    initial_push_s: float | None = None  # clients told to connect → all complete and ACKed
    start_to_complete_s: float | None = None
    median_proxy_s: float | None = None
    edit_one_s: float | None = None  # file written → every proxy that sees the service ACKed
    edit_one_proxies: int | None = None
    edit_all_s: float | None = None
    rss_before_mb: float | None = None  # serving, no client yet
    rss_connected_mb: float | None = None
    rss_peak_mb: float | None = None
    cpu_startup_s: float | None = None
    cpu_push_s: float | None = None
    cpu_edit_one_s: float | None = None
    cpu_edit_all_s: float | None = None
    pushed_initial_mb: float | None = None
    pushed_edit_one_mb: float | None = None
    pushed_edit_all_mb: float | None = None
    responses: int | None = None  # pilotfish_xds_pushes_total at the end
    client_cpu_s: float | None = None
    unexpected_updates: int | None = None  # proxies updated by an edit they do not see
    failure: str | None = None


class _PlaneWatch:
    """RSS of the control plane sampled every 50 ms; kills it above ``max_rss_mb``."""

    def __init__(self, pid: int, max_rss_mb: float) -> None:
        self.process = psutil.Process(pid)
        self.peak_mb = 0.0
        self.killed_for_memory = False
        self._limit = max_rss_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        return float(self.process.memory_info().rss) / 2**20

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = self.rss_mb()
            except psutil.Error:
                return
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self._limit:
                self.killed_for_memory = True
                with contextlib.suppress(psutil.Error):
                    self.process.kill()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(slots=True)
class _Clients:
    """The client processes and what they reported, per node."""

    procs: list[asyncio.subprocess.Process]
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_s: float = 0.0
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start_reading(self) -> None:
        self.readers = [asyncio.create_task(self._read(p)) for p in self.procs]

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            await self.events.put(json.loads(line))

    async def wait(self, pending: Callable[[], list[str]], timeout_s: float, what: str) -> None:
        """Consume events until no node is ``pending()``; errors and the deadline raise
        ``ScaleError``."""
        deadline = time.monotonic() + timeout_s
        while waiting := pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScaleError(f"{what}: {len(waiting)} proxies not done after "
                                 f"{timeout_s:.0f} s, e.g. {', '.join(sorted(waiting)[:3])}")
            try:
                event = await asyncio.wait_for(self.events.get(), remaining)
            except TimeoutError:
                continue
            if event["event"] == "complete":
                self.latest[event["node"]] = event
            elif event["event"] == "error":
                raise ScaleError(f"{what}: proxy {event['node']}: {event['error']}")
            elif event["event"] == "exit":
                self.cpu_s += float(event["cpu_s"])

    def pushed_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.latest.values())

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.write(b"stop\n")
                    await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self.readers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, 5)
        while not self.events.empty():
            event = self.events.get_nowait()
            if event["event"] == "exit":
                self.cpu_s += float(event["cpu_s"])


async def _spawn_clients(
    port: int, nodes: Sequence[tuple[str, str]], processes: int, log_dir: Path
) -> _Clients:
    groups = [nodes[i::processes] for i in range(processes) if nodes[i::processes]]
    procs = []
    for i, group in enumerate(groups):
        with (log_dir / f"clients-{i}.log").open("ab") as log:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.ads_clients", "--port", str(port),
                *(f"{n}={s}" for n, s in group),
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, start_new_session=True,
            ))
    clients = _Clients(procs)
    for proc in procs:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if json.loads(line or b"{}").get("event") != "ready":
            await clients.stop()
            raise ScaleError(f"a client process did not start; see {log_dir}/clients-*.log")
    return clients


def _scrape_counter(metrics_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name)))


@dataclass(slots=True)
class _Profiling:
    """py-spy attached to the control plane for ``duration_s`` from ``start()``."""

    out_dir: Path
    duration_s: int = 10
    # A push can be over in well under a second: sample often enough to see it.
    rate_hz: int = 500
    procs: list[Spawned] = field(default_factory=list)

    def start(self, pid: int, phase: str) -> None:
        out = self.out_dir / f"py-spy-{phase}.txt"
        argv = [str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p", str(pid),
                "-d", str(self.duration_s), "-r", str(self.rate_hz), "-f", "raw", "-o", str(out)]
        self.procs.append(Spawned(f"py-spy {phase}", argv, self.out_dir / f"py-spy-{phase}.log"))

    def finish(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.popen.wait(self.duration_s + 30)
            proc.stop()


async def run_once(
    scenario: Scenario, limits: Limits, client_processes: int, workdir: Path,
    profile: _Profiling | None = None, source: Path = REPO,
) -> RunFigures:
    """One measured run; ``source`` is the checkout the control plane runs from."""
    mesh = generate_mesh(scenario)
    mesh_path = workdir / "mesh.yaml"
    write_mesh(mesh_path, mesh_text(mesh))
    nodes = [(f"proxy-{i:04d}", s) for i, s in enumerate(proxy_services(mesh, scenario.proxies))]
    views = {n: visible_services(mesh, s) for n, s in nodes}
    port, metrics_port = free_port(), free_port()
    clients = await _spawn_clients(port, nodes, client_processes, workdir)
    plane = Spawned("control plane", [
        sys.executable, "-m", "pilotfish", "control-plane", "--config", str(mesh_path),
        "--port", str(port), "--metrics-address", f"127.0.0.1:{metrics_port}",
    ], workdir / "control-plane.log", cwd=source)
    t_spawn = time.monotonic()
    watch = _PlaneWatch(plane.pid, limits.max_rss_mb)
    fig = RunFigures()
    mb = 1 / 1e6
    try:
        if profile is not None:
            profile.start(plane.pid, "startup")
        while not (tcp_accepts(port) and tcp_accepts(metrics_port)):
            if plane.exited() is not None:
                reason = "memory limit" if watch.killed_for_memory else plane.describe_exit()
                raise ScaleError(f"control plane did not start: {reason}")
            if time.monotonic() - t_spawn > limits.start_s:
                raise ScaleError(f"control plane not serving after {limits.start_s:.0f} s "
                                 f"(RSS {watch.rss_mb():.0f} MB)")
            await asyncio.sleep(0.05)
        fig.startup_s = time.monotonic() - t_spawn
        fig.rss_before_mb, cpu_ready = watch.rss_mb(), watch.cpu_s()
        fig.cpu_startup_s = cpu_ready

        await clients.start_reading()
        if profile is not None:
            profile.finish()
            profile.start(plane.pid, "push")
        t_go = time.monotonic()
        for proc in clients.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        await clients.wait(lambda: [n for n, _ in nodes if n not in clients.latest],
                           limits.push_s, "initial push")
        done_at = sorted(float(e["t"]) for e in clients.latest.values())
        fig.initial_push_s = done_at[-1] - t_go
        fig.start_to_complete_s = done_at[-1] - t_spawn
        fig.median_proxy_s = statistics.median(done_at) - t_go
        cpu_pushed, pushed_initial = watch.cpu_s(), clients.pushed_bytes()
        fig.cpu_push_s, fig.pushed_initial_mb = cpu_pushed - cpu_ready, pushed_initial * mb
        await asyncio.sleep(0.5)  # let the plane settle before sampling its memory
        fig.rss_connected_mb = watch.rss_mb()
        if profile is not None:
            profile.finish()  # the push profile covers the push alone, not the edits after it

        edited_one = max(mesh["services"], key=lambda s: sum(s in v for v in views.values()))
        one_moved = with_endpoints_moved(mesh, [edited_one])
        affected = {n for n, v in views.items() if edited_one in v}
        fig.edit_one_proxies = len(affected)
        one = await _edit(clients, mesh_path, one_moved, affected, limits, "edit one")
        cpu_one, pushed_one = watch.cpu_s(), clients.pushed_bytes()
        fig.edit_one_s, fig.unexpected_updates = one.seconds, one.unexpected
        fig.cpu_edit_one_s = cpu_one - cpu_pushed
        fig.pushed_edit_one_mb = (pushed_one - pushed_initial) * mb

        all_moved = with_endpoints_moved(one_moved, list(mesh["services"]))
        every = await _edit(clients, mesh_path, all_moved, set(views), limits, "edit all")
        fig.edit_all_s = every.seconds
        fig.cpu_edit_all_s = watch.cpu_s() - cpu_one
        fig.pushed_edit_all_mb = (clients.pushed_bytes() - pushed_one) * mb
        fig.responses = _scrape_counter(metrics_port, "pilotfish_xds_pushes_total")
    except ScaleError as exc:
        fig.failure = " ".join(str(exc).split()) + (
            " (control plane killed above --max-rss-mb)" if watch.killed_for_memory else "")
    finally:
        await clients.stop()
        plane.stop()
        watch.stop()
        if profile is not None:
            profile.finish()
    fig.rss_peak_mb = watch.peak_mb
    fig.client_cpu_s = clients.cpu_s
    return fig


@dataclass(frozen=True, slots=True)
class _EditOutcome:
    seconds: float
    reached: int
    unexpected: int


async def _edit(
    clients: _Clients, path: Path, mesh: dict[str, Any], affected: set[str], limits: Limits,
    what: str,
) -> _EditOutcome:
    before = {n: e["fp"] for n, e in clients.latest.items()}
    text = mesh_text(mesh)  # before the clock starts: the edit is the write
    t_write = time.monotonic()
    write_mesh(path, text)

    def pending() -> list[str]:
        return [n for n in affected if clients.latest[n]["fp"] == before[n]]

    await clients.wait(pending, limits.edit_s, what)
    unexpected = sum(1 for n, e in clients.latest.items()
                     if n not in affected and e["fp"] != before[n])
    last = max(float(clients.latest[n]["t"]) for n in affected)
    return _EditOutcome(last - t_write, len(affected), unexpected)


# ---------------------------------------------------------------- several runs, the report


@dataclass(slots=True, kw_only=True)
class ScaleResult:
    scenario: Scenario
    runs: list[RunFigures]
    failures: list[str]

    def median(self, name: str) -> float | None:
        """Over every run that measured it, a failed run's earlier phases included."""
        values = [float(v) for r in self.runs if (v := getattr(r, name)) is not None]
        return statistics.median(values) if values else None

    @property
    def runs_ok(self) -> int:
        return sum(1 for r in self.runs if r.failure is None)


async def measure(
    scenario: Scenario, runs: int = 3, client_processes: int = 2, limits: Limits | None = None,
    workdir: Path | None = None, profile_dir: Path | None = None,
    log: Callable[[str], None] = lambda _: None, source: Path = REPO,
) -> ScaleResult:
    """``runs`` fresh runs of one scenario; a failed run is recorded, not raised."""
    limits = limits or Limits()
    result = ScaleResult(scenario=scenario, runs=[], failures=[])
    base = workdir or Path(tempfile.mkdtemp(prefix="cp-scale-"))
    if profile_dir is not None:
        # An extra run, not counted: py-spy pauses the process it samples.
        profile_dir.mkdir(parents=True, exist_ok=True)
        await _one(result, scenario, limits, client_processes, base / "profiled", log, source,
                   _Profiling(profile_dir), counted=False)
    for i in range(runs):
        await _one(result, scenario, limits, client_processes, base / f"run-{i + 1}", log,
                   source)
    return result


async def _one(
    result: ScaleResult, scenario: Scenario, limits: Limits, client_processes: int,
    workdir: Path, log: Callable[[str], None], source: Path,
    profile: _Profiling | None = None, counted: bool = True,
) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        figures = await run_once(scenario, limits, client_processes, workdir, profile, source)
    except ScaleError as exc:  # the client processes did not start
        figures = RunFigures(failure=str(exc))
    log(f"{scenario.label}: {workdir.name}: " + json.dumps(asdict(figures)))
    if figures.failure is not None:
        result.failures.append(f"{workdir.name}: {figures.failure}")
    if counted:
        result.runs.append(figures)


_COLUMNS = (
    ("startup_s", "start s", 1), ("initial_push_s", "push to all s", 2),
    ("median_proxy_s", "median proxy s", 2), ("start_to_complete_s", "spawn→all s", 1),
    ("edit_one_s", "edit 1 svc s", 2), ("edit_all_s", "edit all s", 2),
    ("rss_before_mb", "RSS idle MB", 0), ("rss_connected_mb", "RSS connected MB", 0),
    ("rss_peak_mb", "RSS peak MB", 0), ("cpu_startup_s", "CPU start s", 1),
    ("cpu_push_s", "CPU push s", 1), ("cpu_edit_all_s", "CPU edit all s", 1),
    ("pushed_initial_mb", "pushed MB", 1), ("pushed_edit_all_mb", "edit all MB", 1),
    ("client_cpu_s", "client CPU s", 1),
)


def render_markdown(results: Sequence[ScaleResult], target_s: float = 5.0) -> str:
    header = ["scenario", *(title for _, title, _ in _COLUMNS), "< 5 s", "runs ok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for result in results:
        cells = [result.scenario.label]
        for name, _, digits in _COLUMNS:
            value = result.median(name)
            cells.append("—" if value is None else f"{value:,.{digits}f}")
        push = result.median("initial_push_s")
        cells.append("—" if push is None else ("yes" if push < target_s else "no"))
        cells.append(f"{result.runs_ok}/{len(result.runs)}")
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {result.scenario.label}: {f}" for f in result.failures]
        affected = result.median("edit_one_proxies")
        if affected is not None and result.median("edit_one_s") is not None:
            notes.append(f"- {result.scenario.label}: the one-service edit reached "
                         f"{affected:.0f} of {result.scenario.proxies} proxies (those that see it)")
    return "\n".join([*lines, "", *notes])


# ---------------------------------------------------------------- py-spy summary


def summarise_collapsed(text: str, top: int = 15) -> str:
    """Top frames by self samples, and self samples by module, from ``py-spy -f raw`` output."""
    by_frame: dict[str, int] = {}
    by_module: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        by_frame[leaf] = by_frame.get(leaf, 0) + count
        module = leaf.rsplit("(", 1)[-1].split(":", 1)[0] if "(" in leaf else leaf
        by_module[module] = by_module.get(module, 0) + count
    out = [f"{total} samples", "", "self time by frame:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in _top(by_frame, top)]
    out += ["", "self time by module:"]
    out += [f"  {n / total:6.1%}  {m}" for m, n in _top(by_module, top)]
    return "\n".join(out)


def _top(counts: dict[str, int], n: int) -> Iterator[tuple[str, int]]:
    yield from sorted(counts.items(), key=lambda kv: -kv[1])[:n]


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane_scale",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--views", default="depends_on,all",
                        help="comma-separated, from depends_on, all")
    parser.add_argument("--open-fraction", type=float, default=0.1,
                        help="depends_on view: share of services without depends_on")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=DEFAULT_LIMITS.start_s)
    parser.add_argument("--push-timeout", type=float, default=DEFAULT_LIMITS.push_s)
    parser.add_argument("--edit-timeout", type=float, default=DEFAULT_LIMITS.edit_s)
    parser.add_argument("--max-rss-mb", type=float, default=DEFAULT_LIMITS.max_rss_mb,
                        help="kill the control plane (run failed) above this RSS")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also do one uncounted run under py-spy; raw stacks go here")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--control-plane-source", type=Path, default=REPO,
                        help="run the control plane from this checkout (to compare a patch)")
    return parser


def _stderr(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if not views or any(v not in VIEWS for v in views) or args.runs < 0:
        print("python -m bench.control_plane_scale: --views from depends_on, all; --runs ≥ 0",
              file=sys.stderr)
        return 2
    limits = Limits(start_s=args.start_timeout, push_s=args.push_timeout,
                    edit_s=args.edit_timeout, max_rss_mb=args.max_rss_mb)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cp-scale-"))
    _stderr(f"logs in {workdir}")
    results = []
    for view in views:
        scenario = Scenario(services=args.services, proxies=args.proxies, view=view,
                            open_fraction=args.open_fraction)
        profile_dir = args.profile / view if args.profile is not None else None
        results.append(asyncio.run(measure(
            scenario, args.runs, args.client_processes, limits, workdir / view, profile_dir,
            _stderr, args.control_plane_source.resolve(),
        )))
        for phase in ("startup", "push"):
            raw = profile_dir / f"py-spy-{phase}.txt" if profile_dir is not None else None
            if raw is not None and raw.exists():
                summary = summarise_collapsed(raw.read_text(encoding="utf-8"))
                (raw.parent / f"py-spy-{phase}-summary.txt").write_text(summary + "\n")
                print(f"\n{scenario.label}, py-spy during {phase}:\n{summary}\n")
    print(render_markdown(results))
    print("\nraw runs: " + json.dumps(
        [{"scenario": asdict(r.scenario), "runs": [asdict(x) for x in r.runs],
          "failures": r.failures} for r in results]))
    return 0 if all(r.runs_ok == len(r.runs) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
