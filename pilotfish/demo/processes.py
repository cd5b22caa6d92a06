"""Child processes of the demo: start them, wait until they serve, and always stop them.

Each child gets its own process group, so a terminal's Ctrl-C reaches only the demo, which then
stops the children in order, and stopping a child also stops anything it forked. On Linux a
child is also killed if the demo itself is killed before it can clean up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
PROBE_TIMEOUT = 0.5
POLL_INTERVAL = 0.1


class StartupFailed(Exception):
    """A child exited, or did not become ready in time; the message says which and why."""


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free on loopback right now (all distinct)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the demo is SIGKILLed, its finally blocks
    # never run, so ask the kernel to kill the child instead of leaving it behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """The set of running children; ``stop_all`` is safe to call at any time, more than once."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children))

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Child:
        """``env`` is added to this process's environment."""
        log_path = self._log_dir / f"{name}.log"
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        child = Child(name=name, argv=list(argv), log_path=log_path, process=process)
        self._children.append(child)
        return child

    def stop_all(self, grace: float = 3.0) -> None:
        """SIGTERM every group, wait up to ``grace`` seconds in total, then SIGKILL the rest."""
        for child in self._children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self._children:
            # Even a child that exited may have left forked workers in its group.
            _signal_group(child, signal.SIGKILL)
            child.process.wait()
        self._children.clear()


def _signal_group(child: Child, signum: int) -> None:
    # The group id is the child's pid (start_new_session), and stays valid while any member,
    # or the unreaped child itself, exists; after that there is nothing left to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str) -> int | None:
    """The HTTP status of GET ``url``, or None when nothing answers (never via a proxy)."""
    try:
        with _NO_PROXY.open(url, timeout=PROBE_TIMEOUT) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def sidecar_ready(admin_port: int, listener_ports: Sequence[int]) -> bool:
    """``/ready`` answers 200; or, if the admin server has no ``/ready``, all listeners accept."""
    status = http_status(f"http://127.0.0.1:{admin_port}/ready")
    if status == 200:
        return True
    if status is None or status == 503:
        return False
    return all(tcp_accepts(p) for p in listener_ports)


def wait_ready(probes: Sequence[tuple[Child, Callable[[], bool]]], timeout: float) -> None:
    """Poll every probe until all pass; fail at once if a child exits, or after ``timeout``."""
    pending = list(probes)
    deadline = time.monotonic() + timeout
    while pending:
        for child, _ in pending:
            code = child.exit_code()
            if code is not None:
                raise StartupFailed(
                    f"{child.name} {describe_exit(code)} during startup.\n"
                    f"command: {' '.join(child.argv)}\n"
                    f"last lines of its output ({child.log_path}):\n{_indent(child.tail())}"
                )
        pending = [(child, probe) for child, probe in pending if not probe()]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(child.name for child, _ in pending)
            details = "\n".join(
                f"--- {child.name} ({child.log_path}):\n{_indent(child.tail(10))}"
                for child, _ in pending
            )
            raise StartupFailed(f"not ready after {timeout:.0f} s: {names}\n{details}")
        time.sleep(POLL_INTERVAL)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"
