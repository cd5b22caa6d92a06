"""Instructions per proxied request, counted by valgrind (callgrind): a figure noise can't move.

    python -m bench.instructions [--requests 3000] [--workload h2-small]

Runs one Pilotfish worker (the benchmark bootstrap) under ``valgrind --tool=callgrind``, warms
it up with h2load, zeroes the counters, sends ``--requests`` requests, dumps the counters and
divides. Wall-clock figures move with whatever else the machine does; an instruction count
does not (the same binary, inputs and environment give the same count), so it is the figure to
compare two versions of the code by. It counts the whole process: the event loop, the kernel
boundary's user-side half and the exporter thread, not only Python. Needs Debian's valgrind.
Takes a minute or two: the sidecar starts about fifty times slower under valgrind.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.h2load import H2LOAD, h2load_argv, parse_summary
from bench.procs import Pinning, Spawned, free_port, wait_until_serving
from bench.targets import REPO, nghttpd_argv, pilotfish_bootstrap, write_docroot
from bench.workloads import WORKLOADS, H2loadWorkload

VALGRIND = "/usr/bin/valgrind"
CALLGRIND_CONTROL = "/usr/bin/callgrind_control"
STARTUP_TIMEOUT_S = 300.0  # Python's start under valgrind is slow
WARMUP_REQUESTS = 1000
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def count(workload: H2loadWorkload, requests: int, workdir: Path) -> float:
    """Instructions per request of the sidecar for ``requests`` requests of ``workload``."""
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    docroot = workdir / "docroot"
    write_docroot(docroot)
    upstream_port, admin, listen = free_port(), free_port(), free_port()
    upstream = Spawned(
        "nghttpd", nghttpd_argv(str(docroot), str(upstream_port)), workdir / "nghttpd.log"
    )
    config = workdir / "pilotfish.yaml"
    config.write_text(pilotfish_bootstrap(str(admin), str(listen), str(upstream_port)))
    out = workdir / "callgrind.out"
    argv = [
        VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-m", "pilotfish", "sidecar", "--config", str(config),
    ]  # fmt: skip
    proxy = Spawned("pilotfish (callgrind)", argv, workdir / "pilotfish.log", cwd=REPO)
    try:
        wait_until_serving(upstream, upstream_port, 20.0)
        wait_until_serving(proxy, listen, STARTUP_TIMEOUT_S, ready_port=admin)
        url = f"http://127.0.0.1:{listen}{workload.path}"

        def load(n: int) -> None:
            argv = h2load_argv(
                url=url, requests=str(n), clients=workload.clients, streams=workload.streams
            )
            done = subprocess.run(
                pinning.load() + argv, capture_output=True, text=True, timeout=600, check=False
            )
            summary = parse_summary(done.stdout)
            if summary.problems is not None or summary.status_2xx != n:
                raise RuntimeError(f"h2load: {summary.problems or done.stdout[-400:]}")

        load(WARMUP_REQUESTS)
        _control("-z", proxy.pid)
        load(requests)
        _control("-d", proxy.pid)
        dumps = sorted(workdir.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        match = _TOTALS.search(dumps[-1].read_text(errors="replace"))
        if match is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        return int(match.group(1)) / requests
    finally:
        proxy.stop()
        upstream.stop()


def _control(flag: str, pid: int) -> None:
    subprocess.run(
        [CALLGRIND_CONTROL, flag, str(pid)], capture_output=True, timeout=120, check=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    h2_workloads = {w.key: w for w in WORKLOADS if isinstance(w, H2loadWorkload)}
    parser.add_argument("--workload", choices=sorted(h2_workloads), default="h2-small")
    args = parser.parse_args(argv)
    missing = [tool for tool in (VALGRIND, CALLGRIND_CONTROL, H2LOAD) if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y valgrind nghttp2-client "
              "nghttp2-server)", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
        per_request = count(h2_workloads[args.workload], args.requests, Path(scratch))
    print(f"{args.workload}: {per_request:,.0f} instructions per request "
          f"({args.requests} requests, callgrind)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
