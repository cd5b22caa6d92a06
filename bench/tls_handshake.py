"""Instructions per mTLS handshake between two sidecars' TLS contexts, counted by callgrind;
and, with ``--proxies``, per new connection and per request in Pilotfish (plaintext and STRICT
mTLS) beside nghttpx (cleartext and TLS), in one run.

    python -m bench.tls_handshake [--handshakes 200]
    python -m bench.tls_handshake --proxies [--connections 100 --requests 1000] [--clock]

Builds a root CA and two workload certificates (P-256, as the sidecar makes them), then runs
the handshakes in one process over socket pairs: client and server contexts from
``sidecar.security.tls``, and the SPIFFE ID check on both sides, as a STRICT listener and an
mTLS cluster do. Runs that program twice under ``valgrind --tool=callgrind`` (N handshakes,
and none) and divides the difference by N, so start-up and certificate making cancel out.
The figure is what one new meshed connection costs in CPU, both ends together; requests on an
established connection pay only the symmetric cipher. Needs Debian's valgrind.

``--proxies`` runs each target as its own process under callgrind (``bench.tls_connections``
says what the client does), zeroes the counters, opens the connections, dumps, and does the
same for the requests on one connection: the server proxy's instructions only, the client's
side not counted. Needs nghttp2-server and nghttp2-proxy too; takes a few minutes.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.procs import Spawned
from bench.tls_connections import TARGETS, Cost, Figures, Meter, clock_meter, run

VALGRIND = "/usr/bin/valgrind"
CALLGRIND_CONTROL = "/usr/bin/callgrind_control"
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _handshakes(count: int) -> None:
    """The measured program: ``count`` handshakes (with peer checks) after the setup."""
    from control_plane.ca.authority import CertificateAuthority, Signer, TrustBundle, create_root
    from pilotfish.identity import SpiffeId
    from sidecar.security.csr import build_csr, generate_key
    from sidecar.security.tls import Svid, check_peer, client_context, server_context

    now = time.time()
    root, root_key = create_root("cluster.local", now)
    ca = CertificateAuthority(
        Signer(root, root_key), TrustBundle((root,)), "cluster.local", time.time
    )

    def svid(name: str) -> Svid:
        who = SpiffeId("cluster.local", "default", name)
        key = generate_key()
        issued = ca.sign(build_csr(key, who), who)
        return Svid(who, key, issued.chain_pem, ca.bundle.pem(), issued.not_after, now)

    server = server_context(svid("server"), require_client_certificate=True)
    client = client_context(svid("client"))
    for _ in range(count):
        a, b = socket.socketpair()
        s = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        c = client.wrap_socket(b, do_handshake_on_connect=False)
        s.setblocking(False)
        c.setblocking(False)
        done_s = done_c = False
        while not (done_s and done_c):
            for sock, done in ((c, done_c), (s, done_s)):
                if done:
                    continue
                try:
                    sock.do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                if sock is c:
                    done_c = True
                else:
                    done_s = True
        check_peer(c, "cluster.local")
        check_peer(s, "cluster.local")
        s.close()
        c.close()


def _instructions(count: int, workdir: Path) -> int:
    out = workdir / f"callgrind.{count}.out"
    subprocess.run(
        [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         "-m", "bench.tls_handshake", "--run", str(count)],
        check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    match = _TOTALS.search(out.read_text(errors="replace"))
    if match is None:
        raise SystemExit(f"no totals in {out}")
    return int(match.group(1))


def _callgrind_wrap(name: str, workdir: Path) -> list[str]:
    return [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.out"]


def _callgrind_meter(proc: Spawned, workdir: Path) -> Meter:
    """Zero the target's counters, run the phase, dump them: its instructions in the phase."""

    def meter(phase: Callable[[], int]) -> tuple[int, Figures]:
        _control("-z", proc.pid)
        done = phase()
        _control("-d", proc.pid)
        dumps = sorted(workdir.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        match = _TOTALS.search(dumps[-1].read_text(errors="replace"))
        if match is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        return done, {"instructions": float(match.group(1))}

    return meter


def _control(flag: str, pid: int) -> None:
    subprocess.run(
        [CALLGRIND_CONTROL, flag, str(pid)], capture_output=True, timeout=300, check=True
    )


def proxies(connections: int, requests: int, clock: bool) -> list[Cost]:
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        if clock:
            return run(TARGETS, connections, requests, Path(tmp), meter=clock_meter)
        return run(
            TARGETS, connections, requests, Path(tmp), _callgrind_wrap, _callgrind_meter,
            startup_timeout=300.0, timeout=120.0,
        )  # fmt: skip


def format_costs(costs: list[Cost]) -> str:
    """One line per target: instructions, or CPU µs and rates, per connection and request."""
    lines = []
    for c in costs:
        conn, req = c.per_connection, c.per_request
        if "instructions" in conn:
            figures = (
                f"{conn['instructions']:>13,.0f} instructions per new connection, "
                f"{req['instructions']:>9,.0f} per request"
            )
        else:
            figures = (
                f"{conn['cpu_s'] * 1e6:>8,.0f} CPU µs per new connection "
                f"({1 / conn['wall_s']:,.0f} connections/s from one client), "
                f"{req['cpu_s'] * 1e6:>6,.0f} CPU µs per request"
            )
        ok = f"{c.connections_ok}/{c.connections} connections, "
        ok += f"{c.requests_ok}/{c.requests} requests"
        lines.append(f"{c.target:<15} {figures}; {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--proxies", action="store_true", help="the four proxies, not contexts")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--clock", action="store_true",
        help="with --proxies: CPU time and connections/s instead of instructions (quiet machine)",
    )
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        _handshakes(args.run)
        return 0
    if args.proxies:
        print(format_costs(proxies(args.connections, args.requests, args.clock)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base = _instructions(0, Path(tmp))
        total = _instructions(args.handshakes, Path(tmp))
    per = (total - base) / args.handshakes
    print(f"{per / 1e6:.2f}M instructions per mTLS handshake (both ends, with SPIFFE ID checks; "
          f"{args.handshakes} handshakes)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
