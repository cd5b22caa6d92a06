"""The well-behaved client that runs beside each attack, and what the sidecar process costs.

The canary sends one GET at a time over a keep-alive HTTP/1.1 connection (a new one after a
failure) and counts answers and failures; a request counts as failed if it gets no 200 within
``timeout`` seconds. Latencies are kept for the benchmark notes, never asserted on.
"""

from __future__ import annotations

import http.client
import threading
import time

import psutil


class Canary:
    def __init__(
        self, address: str, memory: Memory | None = None, path: str = "/", timeout: float = 5.0
    ) -> None:
        self.memory = memory
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.path = path
        self.timeout = timeout
        self.ok = 0
        self.failed: list[str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def wait_for_answers(self, count: int, seconds: float = 10.0) -> bool:
        deadline = time.monotonic() + seconds
        while self.ok < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ok >= count

    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        for _ in range(100_000):  # bounded; a test stops it long before
            if self._stop.is_set():
                break
            if self.memory is not None:
                self.memory.sample()
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.monotonic()
            try:
                conn.request("GET", self.path, headers={"host": "app"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise OSError(f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append(repr(exc))
                conn.close()
                conn = None
                continue
            self.latencies.append(time.monotonic() - started)
            self.ok += 1
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()


class Memory:
    """The sidecar process's resident memory: at the start, and the peak of later samples."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = int(self.process.memory_info().rss)
        self.peak = self.start

    def sample(self) -> int:
        rss = int(self.process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / (1 << 20)
