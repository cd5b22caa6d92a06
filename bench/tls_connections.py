"""What TLS costs a proxy, in the serving proxy's own process: Pilotfish plaintext, Pilotfish
with STRICT mTLS, nghttpx cleartext and nghttpx with a TLS frontend, side by side in one run.

For each target a client (this process) opens ``connections`` new HTTP/2 connections and on each
waits for the server's SETTINGS (the handshake and the HTTP/2 session start, nothing else), then
sends ``requests`` small GETs on one more connection, which the proxy forwards to an nghttpd
upstream. The Pilotfish mTLS client is what a calling sidecar is: its TLS client context
(``sidecar.security.tls``) with a certificate from the same CA, and the SPIFFE ID check of the
server; the server sidecar gets its own certificate from a control plane's CA, as in a mesh.
nghttpx gets a self-signed test certificate (its clients present none).

A *meter* wraps each phase and says what the target spent on it: ``bench.tls_handshake`` has
one that zeroes and dumps callgrind's counters in the target (run under valgrind), giving
instructions per new connection and per request, and ``clock_meter`` reads the target's CPU
time and the wall clock (CPU per connection and per request, and connections per second from
one client opening them one after another: a handshake rate bound by the round trips, for a
quiet machine only). Tests use ``unmetered`` and get the counts of what succeeded, so the
harness is checked without valgrind and without timing anything.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from bench.procs import (
    Pinning,
    Spawned,
    cpu_seconds,
    free_port,
    process_tree,
    wait_until_serving,
)
from bench.targets import (
    NGHTTPX,
    REPO,
    SMALL_PATH,
    pilotfish_bootstrap,
    python,
    start_upstream,
)

TARGETS = ("pilotfish", "pilotfish-mtls", "nghttpx", "nghttpx-tls")
TRUST_DOMAIN = "cluster.local"
SERVER_ACCOUNT = "bench-server"
CLIENT_ACCOUNT = "bench-client"

Figures = dict[str, float]
Meter = Callable[[Callable[[], int]], tuple[int, Figures]]
"""Runs a phase (which returns how many of its operations succeeded) and returns that count
with what the target spent on it, by unit (``instructions``, ``cpu_s``, ``wall_s``)."""


def unmetered(phase: Callable[[], int]) -> tuple[int, Figures]:
    return phase(), {}


def clock_meter(proc: Spawned, workdir: Path) -> Meter:
    """The target's CPU seconds (its whole process tree) and the wall clock, around a phase."""

    def meter(phase: Callable[[], int]) -> tuple[int, Figures]:
        pids = process_tree(proc.pid)
        cpu, wall = cpu_seconds(pids), time.perf_counter()
        done = phase()
        return done, {"cpu_s": cpu_seconds(pids) - cpu, "wall_s": time.perf_counter() - wall}

    return meter


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    proc: Spawned
    port: int
    tls: ssl.SSLContext | None
    # What the client checks after its handshake (the SPIFFE ID, for mTLS); raises if wrong.
    check: Callable[[ssl.SSLSocket], None] | None = None


@dataclass(frozen=True, slots=True)
class Cost:
    target: str
    connections: int
    connections_ok: int
    requests: int
    requests_ok: int
    # By unit (``instructions``, ``cpu_s``, ``wall_s``); empty when unmetered.
    per_connection: Figures
    per_request: Figures


# ---------------------------------------------------------------- the client


def _open(server: Server, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    if server.tls is None:
        return sock
    # Sidecars send no SNI (peers are told apart by SPIFFE ID); nghttpx's certificate names
    # localhost.
    hostname = "localhost" if server.check is None else None
    tls = server.tls.wrap_socket(sock, server_hostname=hostname)
    if server.check is not None:
        server.check(tls)
    return tls


def _session(server: Server, requests: int, timeout: float) -> int:
    """One connection: SETTINGS both ways, then ``requests`` GETs one after another; how many
    got a 200 (or 1 for a connection that got the server's SETTINGS when ``requests`` is 0)."""
    sock = _open(server, timeout)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    ok = 0
    pending: int | None = None
    settings = False
    sent = 0
    try:
        while True:
            if pending is None and sent < requests:
                pending = conn.get_next_available_stream_id()
                conn.send_headers(pending, [
                    (b":method", b"GET"), (b":scheme", b"https" if server.tls else b"http"),
                    (b":authority", b"localhost"), (b":path", SMALL_PATH.encode()),
                ], end_stream=True)  # fmt: skip
                sent += 1
                sock.sendall(conn.data_to_send())
            if pending is None and (sent == requests and (requests or settings)):
                break
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = True
                elif isinstance(event, h2.events.ResponseReceived):
                    ok += dict(event.headers).get(b":status") == b"200"
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif (
                    isinstance(event, h2.events.StreamEnded | h2.events.StreamReset)
                    and event.stream_id == pending
                ):
                    pending = None
            sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return ok if requests else int(settings)


def measure(
    server: Server, connections: int, requests: int, meter: Meter, timeout: float
) -> Cost:
    # Warm up: the first connections pay for imports, caches and the upstream connection.
    for _ in range(3):
        _session(server, 3, timeout)
    opened, per_connection = meter(
        lambda: sum(_session(server, 0, timeout) for _ in range(connections))
    )
    served, on_one = meter(lambda: _session(server, requests, timeout))
    # The requests' connection cost as much as any other: take it off.
    each = {unit: value / connections for unit, value in per_connection.items()}
    return Cost(
        target=server.name,
        connections=connections,
        connections_ok=opened,
        requests=requests,
        requests_ok=served,
        per_connection=each,
        per_request={unit: (on_one[unit] - each[unit]) / requests for unit in on_one},
    )


# ---------------------------------------------------------------- the targets


def _sidecar_argv(config: Path, *extra: str) -> list[str]:
    return [python(), "-m", "pilotfish", "sidecar", "--config", str(config), *extra]


def _start(name: str, argv: list[str], port: int, workdir: Path, admin: int | None,
           timeout: float) -> Spawned:  # fmt: skip
    proc = Spawned(name, argv, workdir / f"{name}.log", cwd=REPO)
    try:
        wait_until_serving(proc, port, timeout, ready_port=admin)
    except BaseException:
        proc.stop()
        raise
    return proc


def _pilotfish(upstream: int, workdir: Path, wrap: list[str], timeout: float) -> Server:
    admin, listen = free_port(), free_port()
    config = workdir / "pilotfish.yaml"
    config.write_text(pilotfish_bootstrap(str(admin), str(listen), str(upstream)))
    proc = _start("pilotfish", wrap + _sidecar_argv(config), listen, workdir, admin, timeout)
    return Server("pilotfish", proc, listen, None)


@contextmanager
def _control_plane(workdir: Path, timeout: float) -> Iterator[tuple[int, Path]]:
    """A control plane with a CA on disk and a bootstrap token for the server sidecar."""
    port = free_port()
    (workdir / "mesh.yaml").write_text("services: {}\n")
    (workdir / "tokens.yaml").write_text(
        f"tokens:\n  - {{token: bench-secret, service: {SERVER_ACCOUNT}}}\n"
    )
    (workdir / "server.token").write_text("bench-secret\n")
    argv = [
        python(), "-m", "pilotfish", "control-plane", "--config", str(workdir / "mesh.yaml"),
        "--port", str(port), "--ca-dir", str(workdir / "ca"),
        "--bootstrap-tokens", str(workdir / "tokens.yaml"),
    ]  # fmt: skip
    proc = _start("control-plane", argv, port, workdir, None, timeout)
    try:
        yield port, workdir / "ca"
    finally:
        proc.stop()


def _client_context(ca_dir: Path) -> ssl.SSLContext:
    """A calling sidecar's TLS client context, with a certificate from the mesh's CA."""
    from control_plane.ca.settings import CaSettings, build_authority
    from pilotfish.identity import SpiffeId
    from sidecar.security.csr import build_csr, generate_key
    from sidecar.security.tls import Svid, client_context

    authority = build_authority(CaSettings(root_dir=ca_dir), time.time)
    who = SpiffeId(TRUST_DOMAIN, "default", CLIENT_ACCOUNT)
    key = generate_key()
    issued = authority.sign(build_csr(key, who), who)
    now = time.time()
    svid = Svid(who, key, issued.chain_pem, authority.bundle.pem(), issued.not_after, now)
    return client_context(svid)


def _pilotfish_mtls(
    upstream: int, workdir: Path, wrap: list[str], timeout: float, ca: tuple[int, Path]
) -> Server:
    from pilotfish.identity import SpiffeId
    from sidecar.security.tls import check_peer

    admin, listen = free_port(), free_port()
    config = workdir / "pilotfish-mtls.yaml"
    bootstrap = pilotfish_bootstrap(str(admin), str(listen), str(upstream))
    config.write_text(bootstrap.replace("    route_config: local\n",
                                        "    route_config: local\n    mtls: STRICT\n", 1))
    ca_port, ca_dir = ca
    argv = wrap + _sidecar_argv(
        config, "--ca-token-file", str(workdir / "server.token"), "--ca", f"127.0.0.1:{ca_port}",
        "--service-account", SERVER_ACCOUNT,
    )  # fmt: skip
    proc = _start("pilotfish-mtls", argv, listen, workdir, admin, timeout)
    expected = {SpiffeId(TRUST_DOMAIN, "default", SERVER_ACCOUNT)}

    def check(sock: ssl.SSLSocket) -> None:
        check_peer(sock, TRUST_DOMAIN, expected)

    return Server("pilotfish-mtls", proc, listen, _client_context(ca_dir), check)


def test_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for ``localhost`` (key, certificate), for nghttpx."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = workdir / "nghttpx-key.pem", workdir / "nghttpx-cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def nghttpx_argv(listen: str, upstream: str, tls: tuple[str, str] | None) -> list[str]:
    """One worker in one process (so one process is measured), as ``bench.targets.Nghttpx``
    otherwise; with ``tls`` (key, certificate) a TLS frontend offering h2."""
    frontend = f"--frontend=127.0.0.1,{listen}" + ("" if tls else ";no-tls")
    argv = [
        NGHTTPX, "--conf=/dev/null", frontend, f"--backend=127.0.0.1,{upstream};;proto=h2",
        "--workers=1", "--single-process",
    ]  # fmt: skip
    return argv + list(tls) if tls else argv


def _nghttpx(
    upstream: int, workdir: Path, wrap: list[str], timeout: float, tls: bool
) -> Server:
    listen = free_port()
    name = "nghttpx-tls" if tls else "nghttpx"
    context = None
    files = None
    if tls:
        key, cert = test_certificate(workdir)
        files = (str(key), str(cert))
        context = ssl.create_default_context(cafile=str(cert))
        context.set_alpn_protocols(["h2"])
    argv = wrap + nghttpx_argv(str(listen), str(upstream), files)
    proc = _start(name, argv, listen, workdir, None, timeout)
    return Server(name, proc, listen, context)


def run(
    targets: Sequence[str],
    connections: int,
    requests: int,
    workdir: Path,
    wrap: Callable[[str, Path], list[str]] = lambda name, workdir: [],
    meter: Callable[[Spawned, Path], Meter] = lambda proc, workdir: unmetered,
    startup_timeout: float = 20.0,
    timeout: float = 10.0,
) -> list[Cost]:
    """Every target in turn, one at a time, in front of one nghttpd upstream. ``wrap`` prefixes
    a target's command (valgrind); ``meter`` makes the meter for a started target."""
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    upstream = start_upstream("h2", pinning, workdir)
    costs = []
    try:
        for name in targets:
            where = workdir / name
            where.mkdir()
            prefix = wrap(name, where)
            with ExitStack() as stack:
                if name == "pilotfish":
                    server = _pilotfish(upstream.port, where, prefix, startup_timeout)
                elif name == "pilotfish-mtls":
                    ca = stack.enter_context(_control_plane(where, 20.0))
                    server = _pilotfish_mtls(upstream.port, where, prefix, startup_timeout, ca)
                else:
                    tls = name == "nghttpx-tls"
                    server = _nghttpx(upstream.port, where, prefix, startup_timeout, tls)
                stack.callback(server.proc.stop)  # before the control plane stops
                costs.append(
                    measure(server, connections, requests, meter(server.proc, where), timeout)
                )
    finally:
        upstream.proc.stop()
    return costs
