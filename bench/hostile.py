"""Hostile HTTP/2 clients against Pilotfish and nghttpx, side by side, one worker each.

    python -m bench.hostile

Each probe (rapid reset, seven control-frame floods, a zero-window stall) runs on its own
connection while a canary client sends one GET at a time through the same proxy. A row says
what the proxy did to the attacker (the GOAWAY code it sent, if any; streams it refused),
what the attack cost it in resident memory, and the canary's answers, failures and p99
latency during the probe. The outcome columns are deterministic; the latency moves with
whatever else the machine does, so compare the two proxies of one run, not runs.

The attack and canary clients are the ones of the hostile-client tests (``tests/hostile``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Pinning
from bench.targets import LARGE_PATH, SMALL_PATH, Nghttpx, Pilotfish, Target, start_upstream
from tests.hostile import wire
from tests.hostile.canary import Canary, Memory

CODE_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
}
Probe = Callable[[str], str]


def _goaway(client: wire.Client, seconds: float = 3.0) -> str:
    codes = wire.goaway_codes(client.frames(seconds=seconds))
    client.close()
    if codes:
        return "GOAWAY " + CODE_NAMES.get(codes[-1], hex(codes[-1]))
    return "closed" if client.closed_by_peer else "open"


def rapid_reset(address: str) -> str:
    client = wire.Client(address)
    get = [*wire.GET[:3], (b":path", SMALL_PATH.encode())]
    client.send(
        b"".join(
            client.headers(sid, get, end_stream=False) + wire.rst_stream(sid)
            for sid in range(1, 100_000, 2)
        )
    )
    return _goaway(client)


def flood(unit: Callable[[wire.Client], bytes], opening: bool = False) -> Probe:
    def probe(address: str) -> str:
        client = wire.Client(address)
        if opening:
            client.send(client.headers(1, wire.GET, end_stream=False))
        client.flood(unit(client), count=100_000, seconds=20)
        return _goaway(client)

    return probe


def zero_window(address: str) -> str:
    client = wire.Client(address, {wire.INITIAL_WINDOW_SIZE: 0})
    big = [*wire.GET[:3], (b":path", LARGE_PATH.encode())]
    client.send(b"".join(client.headers(sid, big) for sid in range(1, 2000, 2)))
    frames = client.frames(seconds=3)
    client.close()
    refused = sum(1 for code in wire.resets(frames).values() if code == wire.REFUSED_STREAM)
    return f"{refused} of 1000 streams refused"


PROBES: dict[str, Probe] = {
    "rapid reset (50k HEADERS+RST_STREAM)": rapid_reset,
    "SETTINGS flood": flood(lambda c: wire.settings({wire.INITIAL_WINDOW_SIZE: 65535})),
    "PING flood": flood(lambda c: wire.ping(7)),
    "PRIORITY flood": flood(lambda c: wire.priority(3)),
    "WINDOW_UPDATE flood": flood(lambda c: wire.window_update(0, 1)),
    "RST_STREAM flood (closed stream)": flood(lambda c: wire.rst_stream(1), opening=True),
    "empty DATA flood": flood(lambda c: wire.frame(wire.DATA, 0, 1), opening=True),
    "unknown frame type flood": flood(lambda c: wire.frame(0x42, 0, 0, b"x" * 8)),
    "zero window, 1000 streams": zero_window,
}


@dataclass(frozen=True, slots=True)
class Row:
    target: str
    probe: str
    outcome: str
    rss_mib: float
    canary_ok: int
    canary_failed: int
    canary_p99_ms: float


def run_target(target: Target, upstream_port: int, workdir: Path) -> list[Row]:
    running = target.start(upstream_port, Pinning(load_cpu=None, proxy_cpu=None), workdir)
    assert running.proc is not None
    address = f"127.0.0.1:{running.port}"
    rows = []
    try:
        for name, probe in PROBES.items():
            memory = Memory(running.proc.pid)
            with Canary(address, memory, path=SMALL_PATH) as canary:
                canary.wait_for_answers(5)
                outcome = probe(address)
                canary.wait_for_answers(canary.ok + 5)
            memory.sample()
            rows.append(
                Row(target.name, name, outcome, memory.growth_mib, canary.ok,
                    len(canary.failed), canary.p99_ms())
            )  # fmt: skip
            time.sleep(0.5)
    finally:
        running.stop()
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| probe | proxy | to the attacker | RSS growth | canary answers / failed | canary p99 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: (list(PROBES).index(r.probe), r.target)):
        lines.append(
            f"| {row.probe} | {row.target} | {row.outcome} | {row.rss_mib:.1f} MiB "
            f"| {row.canary_ok} / {row.canary_failed} | {row.canary_p99_ms:.1f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pinning = Pinning(load_cpu=None, proxy_cpu=None)
        upstream = start_upstream("h2", pinning, workdir)
        try:
            rows = run_target(Pilotfish(), upstream.port, workdir)
            rows += run_target(Nghttpx(), upstream.port, workdir)
        finally:
            upstream.proc.stop()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
