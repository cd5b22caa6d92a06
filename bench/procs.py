"""Processes the harness starts: spawning them pinned, waiting until they serve, measuring
their CPU and memory from /proc, and stopping them."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    """A process the benchmark needs did not start serving; the message says why."""


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPU the load side (load generator, upstream, harness) and the proxy run on."""

    load_cpu: int | None
    proxy_cpu: int | None

    @classmethod
    def for_this_machine(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(load_cpu=None, proxy_cpu=None)
        return cls(load_cpu=cpus[0], proxy_cpu=cpus[1])

    def load(self) -> list[str]:
        return _taskset(self.load_cpu)

    def proxy(self) -> list[str]:
        return _taskset(self.proxy_cpu)

    def all_cpus(self) -> list[str]:
        """Every CPU of the machine (the harness itself may be pinned, and children inherit)."""
        if self.proxy_cpu is None:
            return []
        return ["taskset", "-c", f"0-{(os.cpu_count() or 1) - 1}"]


def _taskset(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def free_port() -> int:
    """A port that was free a moment ago; the tiny race is acceptable on a quiet machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Spawned:
    """A child process in its own process group, its output going to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        # Appending: a process started again after it exited keeps its predecessor's story.
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def describe_exit(self) -> str:
        tail = self.log_tail()
        return f"{self.name} exited with status {self.popen.returncode}" + (
            f"; its last output:\n{tail}" if tail else " and printed nothing"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group we created, then SIGKILL whatever is left of it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        # Workers may outlive a parent that exited; the group is still ours to end.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace_s)


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(port: int, path: str) -> int | None:
    """Status of an HTTP/1.1 GET, or ``None`` when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_until_serving(
    proc: Spawned, port: int, timeout_s: float, *, ready_port: int | None = None
) -> str:
    """Wait until ``proc`` serves; returns how readiness was decided.

    With ``ready_port``, an admin server answering ``GET /ready`` with 200 decides. While no admin
    server exists, a TCP connect to ``port`` does — admin absent is not an error, only a weaker
    signal, which the returned text records.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.exited() is not None:
            raise StartError(proc.describe_exit())
        if ready_port is not None:
            status = http_status(ready_port, "/ready")
            if status == 200:
                return "admin /ready returned 200"
            if status is None and tcp_accepts(port):
                return "listener accepted a TCP connection (admin /ready did not answer)"
        elif tcp_accepts(port):
            return "listener accepted a TCP connection"
        time.sleep(0.05)
    raise StartError(f"{proc.name} did not become ready within {timeout_s:.0f}s\n{proc.log_tail()}")


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants, found by walking /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, ()))
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, starting at ``state``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; it ends at the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            # After the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
            # cmajflt utime stime — so utime is index 11 and stime index 12.
            ticks += int(stat[11]) + int(stat[12])
    return ticks / CLOCK_TICKS_PER_S


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident_pages * PAGE_SIZE
    return total


IDLE_SETTLE_S = 1.0


def idle_rss_bytes(pid: int, settle_s: float = IDLE_SETTLE_S) -> int:
    """RSS summed over ``pid``'s process tree once it has been left alone for ``settle_s``:
    a target just reported ready may still be finishing its start (workers, first timers)."""
    time.sleep(settle_s)
    return rss_bytes(process_tree(pid))


def core_busy_seconds(cpu: int) -> float:
    """Time ``cpu`` was not idle (hypervisor steal included), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS_PER_S
    raise ValueError(f"/proc/stat has no line for CPU {cpu}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowFigures:
    """What one load run cost the proxy, and how busy others kept the proxy's core."""

    proxy_cpu_s: float | None
    proxy_peak_rss_bytes: int | None
    proxy_processes: int | None
    others_on_proxy_core_pct: float | None


class LoadWindow:
    """Watches the proxy over one load run: ``start()`` before the load, ``stop()`` after.

    Proxy CPU is the utime+stime growth of its process tree; memory is sampled every
    ``interval_s`` and the peak of the sum over the tree is kept (a sum of per-process peaks
    would overstate it). Whatever else kept the proxy's core busy meanwhile (other processes,
    hypervisor steal) is reported as noise, for direct runs too.
    """

    def __init__(self, proxy_pid: int | None, proxy_core: int | None, interval_s: float = 0.1):
        self._pids = process_tree(proxy_pid) if proxy_pid is not None else []
        self._core = proxy_core
        self._interval = interval_s
        self._stop = threading.Event()
        self._peak = rss_bytes(self._pids)
        self._cpu_start = 0.0
        self._core_start = 0.0
        self._wall_start = 0.0
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._cpu_start = cpu_seconds(self._pids)
        if self._core is not None:
            self._core_start = core_busy_seconds(self._core)
        self._wall_start = time.monotonic()
        if self._pids:
            self._thread.start()

    def stop(self) -> WindowFigures:
        wall = time.monotonic() - self._wall_start
        cpu = cpu_seconds(self._pids) - self._cpu_start
        others = None
        if self._core is not None and wall > 0:
            busy = core_busy_seconds(self._core) - self._core_start
            others = max(0.0, busy - cpu) / wall * 100
        if self._pids:
            self._stop.set()
            self._thread.join()
        return WindowFigures(
            proxy_cpu_s=cpu if self._pids else None,
            proxy_peak_rss_bytes=self._peak if self._pids else None,
            proxy_processes=len(self._pids) if self._pids else None,
            others_on_proxy_core_pct=others,
        )

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, rss_bytes(self._pids))
