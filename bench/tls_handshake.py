"""Instructions per mTLS handshake between two sidecars' TLS contexts, counted by callgrind.

    python -m bench.tls_handshake [--handshakes 200]

Builds a root CA and two workload certificates (P-256, as the sidecar makes them), then runs
the handshakes in one process over socket pairs: client and server contexts from
``sidecar.security.tls``, and the SPIFFE ID check on both sides, as a STRICT listener and an
mTLS cluster do. Runs that program twice under ``valgrind --tool=callgrind`` (N handshakes,
and none) and divides the difference by N, so start-up and certificate making cancel out.
The figure is what one new meshed connection costs in CPU, both ends together; requests on an
established connection pay only the symmetric cipher. Needs Debian's valgrind.
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
from pathlib import Path

VALGRIND = "/usr/bin/valgrind"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        _handshakes(args.run)
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
