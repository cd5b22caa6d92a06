"""Instructions per proxied request, counted by valgrind (callgrind): a figure noise can't move.

    python -m bench.instructions [--requests 3000] [--workload h2-small|grpc-16|...]
                                 [--codec ngh2|python] [--mypyc]

Runs one Pilotfish worker (the benchmark bootstrap) under ``valgrind --tool=callgrind``, warms
it up with the workload's load generator (h2load, or the gRPC client of ``bench.grpc_echo``),
zeroes the counters, sends ``--requests`` requests, dumps the counters and divides.
Wall-clock figures move with whatever else the machine does; an instruction count does not
(the same binary, inputs and environment give the same count), so it is the figure to compare
two versions of the code by. It counts the whole process: the event loop, the kernel
boundary's user-side half and the exporter thread, not only Python. Needs Debian's valgrind.
Takes a minute or two: the sidecar starts about fifty times slower under valgrind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.h2load import H2LOAD, h2load_argv, parse_summary
from bench.procs import Pinning, Spawned, free_port, wait_until_serving
from bench.targets import (
    REPO,
    check_mypyc_python,
    mypyc_python,
    pilotfish_bootstrap,
    start_upstream,
)
from bench.workloads import WORKLOADS, GrpcWorkload, H2loadWorkload, Workload, grpc_client_argv

VALGRIND = "/usr/bin/valgrind"
CALLGRIND_CONTROL = "/usr/bin/callgrind_control"
STARTUP_TIMEOUT_S = 300.0  # Python's start under valgrind is slow
WARMUP_REQUESTS = 1000
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Count:
    """Instructions per request, and how many of them copied memory (``copying``)."""

    total: float
    copying: float


def copying(callgrind_out: str) -> int:
    """The instructions spent inside libc's memcpy and memmove (their own, not their callers').

    Valgrind counts a ``rep movsb`` once per byte it moves, so with glibc's ERMS copies a
    64 KiB copy counts as about 65,500 instructions, where a CPU moves 32 or 64 bytes a cycle:
    in a body-carrying workload copying can dominate the count while costing little time. This
    says how much of a count it is. Names in the file are compressed: ``fn=(12) name`` the first
    time, ``fn=(12)`` after; cost lines follow their ``fn=``, those after ``calls=`` are a call's
    inclusive cost, not the function's own.
    """
    names: dict[str, str] = {}
    counting = after_call = False
    total = 0
    for line in callgrind_out.splitlines():
        if line.startswith("fn="):
            ident, _, name = line[3:].partition(" ")
            if name:
                names[ident] = name
            name = names.get(ident, ident)
            counting = "memcpy" in name or "memmove" in name
        elif line.startswith("cfn="):
            ident, _, name = line[4:].partition(" ")
            if name:
                names[ident] = name
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
            elif counting:
                fields = line.split()
                if len(fields) > 1:
                    total += int(fields[1])
    return total


def count(
    workload: Workload, requests: int, workdir: Path, codec: str | None = None,
    interpreter: Sequence[str] = (sys.executable,),
) -> Count:
    """Instructions per request of the sidecar for ``requests`` requests of ``workload``, with
    the HTTP/2 ``codec`` given (``PILOTFISH_H2_CODEC``; None: the sidecar's default), the
    sidecar run by ``interpreter``."""
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    upstream = start_upstream(workload.upstream, pinning, workdir)
    admin, listen = free_port(), free_port()
    config = workdir / "pilotfish.yaml"
    config.write_text(pilotfish_bootstrap(str(admin), str(listen), str(upstream.port)))
    out = workdir / "callgrind.out"
    argv = [
        VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}",
        *interpreter, "-m", "pilotfish", "sidecar", "--config", str(config),
    ]  # fmt: skip
    env = None if codec is None else {**os.environ, "PILOTFISH_H2_CODEC": codec}
    proxy = Spawned("pilotfish (callgrind)", argv, workdir / "pilotfish.log", cwd=REPO, env=env)
    try:
        wait_until_serving(proxy, listen, STARTUP_TIMEOUT_S, ready_port=admin)
        if isinstance(workload, H2loadWorkload):
            _h2load(workload, listen, WARMUP_REQUESTS)
            _control("-z", proxy.pid)
            _h2load(workload, listen, requests)
        else:
            _grpc(workload, listen, requests, zero=lambda: _control("-z", proxy.pid))
        _control("-d", proxy.pid)
        dumps = sorted(workdir.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace")
        match = _TOTALS.search(text)
        if match is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        return Count(int(match.group(1)) / requests, copying(text) / requests)
    finally:
        proxy.stop()
        upstream.proc.stop()


def _h2load(workload: H2loadWorkload, port: int, n: int) -> None:
    url = f"http://127.0.0.1:{port}{workload.path}"
    argv = h2load_argv(url=url, requests=str(n), clients=workload.clients, streams=workload.streams)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    summary = parse_summary(done.stdout)
    if summary.problems is not None or summary.status_2xx != n:
        raise RuntimeError(f"h2load: {summary.problems or done.stdout[-400:]}")


def _grpc(workload: GrpcWorkload, port: int, n: int, zero: Callable[[], None]) -> None:
    """Warms up, calls ``zero`` once the client is ready, then makes exactly ``n`` calls."""
    argv = grpc_client_argv(
        str(port), workload.in_flight, duration_s="3600", max_calls=str(n),
        warmup_calls=str(WARMUP_REQUESTS), payload_bytes=workload.payload_bytes,
    )  # fmt: skip
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("gRPC client: no warm-up")
        zero()
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        if result["calls"] != n or result["errors"] or result["wrong_replies"]:
            raise RuntimeError(f"gRPC client: {result}")


def _control(flag: str, pid: int) -> None:
    subprocess.run(
        [CALLGRIND_CONTROL, flag, str(pid)], capture_output=True, timeout=120, check=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    workloads = {w.key: w for w in WORKLOADS}
    parser.add_argument("--workload", choices=sorted(workloads), default="h2-small")
    parser.add_argument("--codec", choices=("ngh2", "python"), default=None,
                        help="the sidecar's HTTP/2 codec (default: its own default)")
    parser.add_argument(
        "--mypyc", action="store_true",
        help="count the compiled build (PILOTFISH_MYPYC_PYTHON, default .venv-mypyc/bin/python)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    interpreter = [sys.executable]
    if args.mypyc:
        interpreter = [mypyc_python(), "-P"]
        try:
            check_mypyc_python(interpreter[0])
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
    missing = [tool for tool in (VALGRIND, CALLGRIND_CONTROL, H2LOAD) if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y valgrind nghttp2-client "
              "nghttp2-server)", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
        per_request = count(
            workloads[args.workload], args.requests, Path(scratch), args.codec, interpreter
        )
    codec = f", {args.codec} codec" if args.codec else ""
    build = ", mypyc build" if args.mypyc else ""
    print(f"{args.workload}: {per_request.total:,.0f} instructions per request, "
          f"{per_request.copying:,.0f} of them in memcpy/memmove "
          f"({args.requests} requests, callgrind{codec}{build})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
