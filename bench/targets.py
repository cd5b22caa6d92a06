"""What traffic goes through: nothing (direct), Pilotfish, or nghttpx, and the upstreams behind.

Every command is built by a function whose port arguments are strings, so the report prints
the very command that ran with placeholders where runtime-chosen ports were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.procs import Pinning, Spawned, free_port, wait_until_serving

REPO = Path(__file__).resolve().parent.parent
NGHTTPD = "/usr/sbin/nghttpd"
NGHTTPX = "/usr/sbin/nghttpx"
STARTUP_TIMEOUT_S = 20.0
SMALL_BODY_BYTES = 128
LARGE_BODY_BYTES = 64 * 1024
SMALL_PATH = "/small"
LARGE_PATH = "/64k"


def python() -> str:
    return sys.executable


# The compiled build (``PILOTFISH_MYPYC=1 pip install``, see README.md): a virtualenv of
# its own, run with ``-P`` so that the checkout's sources (the working directory) do not
# shadow the installed extensions.
MYPYC_PYTHON_ENV = "PILOTFISH_MYPYC_PYTHON"
MYPYC_PROBE_MODULE = "sidecar.http.h2conn"


def mypyc_python() -> str:
    """The interpreter of the compiled build: ``$PILOTFISH_MYPYC_PYTHON``, or the checkout's
    ``.venv-mypyc``."""
    return os.environ.get(MYPYC_PYTHON_ENV) or str(REPO / ".venv-mypyc" / "bin" / "python")


def check_mypyc_python(interpreter: str) -> None:
    """Raises unless ``interpreter`` imports the request path compiled: a measurement of the
    pure-Python package under the compiled name would be a wrong figure, not a failure."""
    if not os.access(interpreter, os.X_OK):
        raise RuntimeError(
            f"{interpreter}: no such interpreter; build the compiled variant as README.md "
            f"says (or set {MYPYC_PYTHON_ENV})"
        )
    probe = f"import {MYPYC_PROBE_MODULE} as m; print(m.__file__)"
    done = subprocess.run(
        [interpreter, "-P", "-c", probe], capture_output=True, text=True, timeout=60,
        cwd=REPO, check=False,
    )  # fmt: skip
    where = done.stdout.strip()
    if done.returncode != 0 or not where.endswith(".so"):
        raise RuntimeError(
            f"{interpreter} does not import {MYPYC_PROBE_MODULE} compiled "
            f"({where or done.stderr.strip()[-300:]}): install with PILOTFISH_MYPYC=1"
        )


# ---------------------------------------------------------------- upstreams


def nghttpd_argv(docroot: str, port: str) -> list[str]:
    return [NGHTTPD, "--no-tls", "-a", "127.0.0.1", "-d", docroot, port]


def grpc_server_argv(port: str) -> list[str]:
    return [python(), "-m", "bench.grpc_echo", "server", "--port", port]


def write_docroot(docroot: Path) -> None:
    docroot.mkdir(parents=True, exist_ok=True)
    (docroot / SMALL_PATH.lstrip("/")).write_bytes(b"s" * SMALL_BODY_BYTES)
    # Incompressible is irrelevant for h2 (no body compression), so a fixed pattern is fine.
    (docroot / LARGE_PATH.lstrip("/")).write_bytes(bytes(range(256)) * (LARGE_BODY_BYTES // 256))


@dataclass(frozen=True, slots=True)
class Upstream:
    kind: str  # "h2" (nghttpd) or "grpc"
    port: int
    proc: Spawned


def start_upstream(kind: str, pinning: Pinning, workdir: Path) -> Upstream:
    port = free_port()
    if kind == "h2":
        docroot = workdir / "docroot"
        write_docroot(docroot)
        argv = pinning.load() + nghttpd_argv(str(docroot), str(port))
    else:
        argv = pinning.load() + grpc_server_argv(str(port))
    proc = Spawned(f"{kind} upstream", argv, workdir / f"upstream-{kind}.log", cwd=REPO)
    try:
        wait_until_serving(proc, port, STARTUP_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return Upstream(kind=kind, port=port, proc=proc)


# ---------------------------------------------------------------- proxies


@dataclass(frozen=True, slots=True)
class Running:
    """A target ready for load: where to send it, and the process tree to measure."""

    port: int
    proc: Spawned | None
    readiness: str

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class Target(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def is_proxy(self) -> bool: ...

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]: ...

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running: ...


class Direct:
    name = "direct"
    is_proxy = False

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        return []

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        return Running(port=upstream_port, proc=None, readiness="no proxy")


def pilotfish_bootstrap(admin_port: str, listen_port: str, upstream_port: str) -> str:
    return f"""\
node_id: bench
admin: {{address: 127.0.0.1, port: {admin_port}}}
# The issue's workload: routing, a retry policy, metrics on, tracing sampled at 1%. Spans go to
# a port nobody listens on (they are dropped and counted); access logs are off, as nghttpx's.
tracing: {{endpoint: "http://127.0.0.1:9", sampling: 1%}}
access_log: {{sink: "off"}}
listeners:
  - name: ingress
    address: 127.0.0.1:{listen_port}
    route_config: local
route_configs:
  - name: local
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{prefix: /}}
            route: {{cluster: upstream, timeout: 15s}}
            retry: {{attempts: 1, retry_on: [connect-failure, refused-stream, reset, unavailable]}}
clusters:
  - name: upstream
    protocol: http2
    endpoints: [127.0.0.1:{upstream_port}]
"""


@dataclass(frozen=True, slots=True)
class Pilotfish:
    workers: int = 1
    # Let the workers use every core instead of the proxy's one: the scaling question. The
    # load side still runs on its core, so the proxy's workers share that one with it.
    all_cpus: bool = False
    # The HTTP/2 codec (PILOTFISH_H2_CODEC); None: the default, ngh2 when it is installed.
    codec: str | None = None
    # The compiled build (``mypyc_python()``) instead of this interpreter's package.
    mypyc: bool = False

    @property
    def name(self) -> str:
        name = "pilotfish" if self.workers == 1 else f"pilotfish-{self.workers}w"
        if self.mypyc:
            name += "-mypyc"
        if self.codec is not None:
            name += f"-{self.codec}-codec"
        return f"{name}-all-cpus" if self.all_cpus else name

    @property
    def is_proxy(self) -> bool:
        return True

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        interpreter = [mypyc_python(), "-P"] if self.mypyc else [python()]
        argv = [*interpreter, "-m", "pilotfish", "sidecar", "--config", config_file]
        if self.codec is not None:
            argv = ["env", f"PILOTFISH_H2_CODEC={self.codec}", *argv]
        if self.workers != 1:
            argv += ["--concurrency", str(self.workers)]
        return argv

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        where = pinning.all_cpus() if self.all_cpus else pinning.proxy()
        if self.mypyc:
            check_mypyc_python(mypyc_python())
        return start_sidecar(self, pilotfish_bootstrap, where, upstream_port, workdir)


def start_sidecar(
    target: Target, bootstrap: Callable[[str, str, str], str], where: list[str],
    upstream_port: int, workdir: Path,
) -> Running:  # fmt: skip
    """Writes ``bootstrap(admin, listen, upstream)`` and runs ``target`` on it until it serves."""
    admin, listen = free_port(), free_port()
    config = workdir / f"{target.name}-{upstream_port}.yaml"
    config.write_text(bootstrap(str(admin), str(listen), str(upstream_port)))
    argv = where + target.command(str(upstream_port), str(listen), str(config))
    proc = Spawned(target.name, argv, config.with_suffix(".log"), cwd=REPO)
    try:
        readiness = wait_until_serving(proc, listen, STARTUP_TIMEOUT_S, ready_port=admin)
    except BaseException:
        proc.stop()
        raise
    return Running(port=listen, proc=proc, readiness=readiness)


def pilotfish_tcp_bootstrap(admin_port: str, listen_port: str, upstream_port: str) -> str:
    return f"""\
node_id: bench-tcp
admin: {{address: 127.0.0.1, port: {admin_port}}}
# L4 passthrough: every connection is relayed to the upstream as bytes, unparsed; no routes,
# no L7 policy, no tracing, no access log.
access_log: {{sink: "off"}}
listeners:
  - name: ingress
    address: 127.0.0.1:{listen_port}
    mode: tcp
    tcp_passthrough: {{cluster: upstream}}
clusters:
  - name: upstream
    protocol: tcp
    endpoints: [127.0.0.1:{upstream_port}]
"""


class PilotfishTcp:
    """One Pilotfish process relaying at L4: the same h2 bytes, no HTTP parsing."""

    name = "pilotfish-tcp"
    is_proxy = True

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        return [python(), "-m", "pilotfish", "sidecar", "--config", config_file]

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        return start_sidecar(self, pilotfish_tcp_bootstrap, pinning.proxy(), upstream_port, workdir)


class Nghttpx:
    name = "nghttpx"
    is_proxy = True

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        # --conf=/dev/null: Debian's /etc/nghttpx/nghttpx.conf would add its own frontend and
        # send errors to syslog.
        return [
            NGHTTPX,
            "--conf=/dev/null",
            f"--frontend=127.0.0.1,{listen_port};no-tls",
            f"--backend=127.0.0.1,{upstream_port};;proto=h2",
            "--workers=1",
        ]

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        listen = free_port()
        argv = pinning.proxy() + self.command(str(upstream_port), str(listen), "")
        proc = Spawned(self.name, argv, workdir / f"nghttpx-{upstream_port}.log", cwd=REPO)
        try:
            readiness = wait_until_serving(proc, listen, STARTUP_TIMEOUT_S)
        except BaseException:
            proc.stop()
            raise
        return Running(port=listen, proc=proc, readiness=readiness)
