"""``pilotfish sidecar``: run the proxy from a static bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from pilotfish.config.bootstrap import load_bootstrap_file
from pilotfish.config.errors import ConfigError
from pilotfish.config.model import Bootstrap
from sidecar.admin import AdminServer
from sidecar.server import Sidecar

log = logging.getLogger("pilotfish.sidecar")


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    bootstrap: Bootstrap,
    *,
    admin: bool = True,
    reuse_port: bool = False,
    signals: bool = True,
    started: Callable[[Sidecar], None] | None = None,
) -> int:
    sidecar = Sidecar(bootstrap, reuse_port=reuse_port)
    loop = asyncio.get_event_loop()
    if signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sidecar.request_stop)
    admin_server = AdminServer(sidecar)
    if admin:
        await admin_server.start(bootstrap.admin.host, bootstrap.admin.port)
        log.info("admin on http://%s:%d/", bootstrap.admin.host, bootstrap.admin.port)
    await sidecar.start()
    if started is not None:
        started(sidecar)
    await sidecar.stopped.wait()
    admin_server.close()
    log.info("stopped")
    return 0


def _run_worker(bootstrap: Bootstrap, admin: bool, reuse_port: bool) -> int:
    _install_event_loop_policy()
    return asyncio.run(serve(bootstrap, admin=admin, reuse_port=reuse_port))


def run_sidecar(args: argparse.Namespace) -> int:
    if not args.config:
        print("pilotfish sidecar: --config FILE is required", file=sys.stderr)
        return 2
    try:
        bootstrap = load_bootstrap_file(args.config)
    except (ConfigError, OSError) as exc:
        print(f"pilotfish sidecar: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    workers = max(1, int(args.concurrency))
    if workers == 1:
        return _run_worker(bootstrap, admin=True, reuse_port=False)
    return _run_workers(bootstrap, workers)


def _run_workers(bootstrap: Bootstrap, workers: int) -> int:
    """Fork workers that share the listening ports through SO_REUSEPORT; worker 0 runs admin."""
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_worker(bootstrap, admin=index == 0, reuse_port=True)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status
