"""The watch against a real HTTP server speaking the Kubernetes list/watch protocol, through
the real client library and a kubeconfig: list then watch, bookmarks, a dropped watch, 410
Gone, a restarted server with a new resourceVersion, a server that is down a while."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from control_plane.kube.state import ClusterState
from control_plane.kube.watch import KubeWatcher, api_client
from tests.kube_fake import SERVICES, SLICES, FakeKubeApi, endpoint, endpoint_slice, service


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


class Harness:
    def __init__(self, fake: FakeKubeApi, watcher: KubeWatcher, state: ClusterState) -> None:
        self.fake = fake
        self.watcher = watcher
        self.state = state
        self.changes = 0

    def pods(self) -> list[str]:
        found = self.state.services().get("quotes.default")
        return [p.address for p in found.endpoints.get("grpc", ())] if found else []


def run(tmp_path: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            await body(h)

    asyncio.run(asyncio.wait_for(main(), 40))


@asynccontextmanager
async def _harness(tmp_path: Path) -> AsyncIterator[Harness]:
    fake = FakeKubeApi(version_base=100).start()
    fake.put(SERVICES, service("quotes", "default", 7001))
    fake.put(SLICES, endpoint_slice("q-1", "default", "quotes", 8080, [endpoint("10.0.0.1")]))
    api = await api_client(str(fake.kubeconfig(tmp_path / "kubeconfig")))
    state = ClusterState()
    holder: list[Harness] = []

    def changed() -> None:
        holder[0].changes += 1

    watcher = KubeWatcher(api, state, changed, backoff_initial=0.05, backoff_max=0.2)
    h = Harness(fake, watcher, state)
    holder.append(h)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 10)
        yield h
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await api.close()
        fake.stop()


def test_list_then_watch_from_the_list_version_with_bookmarks(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        fake = harness.fake
        assert harness.pods() == ["10.0.0.1"]
        await _until(lambda: len(fake.watch_requests(SLICES)) == 1)
        (watch,) = fake.watch_requests(SLICES)
        assert watch.params["resourceVersion"] == "102"  # the list's version
        assert watch.params["allowWatchBookmarks"].lower() == "true"
        fake.put(
            SLICES,
            endpoint_slice(
                "q-1", "default", "quotes", 8080, [endpoint("10.0.0.1"), endpoint("10.0.0.2")]
            ),
        )
        await _until(lambda: harness.pods() == ["10.0.0.1", "10.0.0.2"])
        fake.bookmark()
        await _until(lambda: harness.watcher.stats.bookmarks >= 2)  # one per kind
        assert fake.list_requests(SLICES) and len(fake.list_requests(SLICES)) == 1

    run(tmp_path, body)


def test_a_dropped_watch_resumes_from_the_last_version_without_a_relist(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        fake = harness.fake
        await _until(lambda: fake.open_watches() == 2)
        fake.bookmark()
        await _until(lambda: harness.watcher.stats.bookmarks >= 2)
        assert fake.drop_watches() == 2
        # A change while no watch is open is delivered by the resumed watch.
        fake.put(SLICES, endpoint_slice("q-1", "default", "quotes", 8080, [endpoint("10.0.0.3")]))
        await _until(lambda: harness.pods() == ["10.0.0.3"])
        resumed = fake.watch_requests(SLICES)[1]
        assert resumed.params["resourceVersion"] == "103"  # the bookmark's
        assert len(fake.list_requests(SLICES)) == 1

    run(tmp_path, body)


def test_gone_relists_and_notices_deletions_missed(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        fake = harness.fake
        await _until(lambda: fake.open_watches() == 2)
        fake.stop()  # down: nothing reaches the watch
        fake.delete(SLICES, "default", "q-1")
        fake.put(SLICES, endpoint_slice("q-2", "default", "quotes", 8080, [endpoint("10.0.0.4")]))
        fake.compact()
        assert harness.pods() == ["10.0.0.1"]  # the last known endpoints are still there
        fake.start(fake.port)
        await _until(lambda: harness.pods() == ["10.0.0.4"])
        assert harness.watcher.stats.gone >= 1
        assert len(fake.list_requests(SLICES)) == 2

    run(tmp_path, body)


def test_a_restarted_server_with_new_versions_loses_nothing(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        fake = harness.fake
        await _until(lambda: fake.open_watches() == 2)
        fake.put(SLICES, endpoint_slice("q-1", "default", "quotes", 8080, [endpoint("10.0.0.5")]))
        await _until(lambda: harness.pods() == ["10.0.0.5"])
        fake.restart(version_base=9000)
        fake.put(
            SLICES,
            endpoint_slice(
                "q-1", "default", "quotes", 8080, [endpoint("10.0.0.5"), endpoint("10.0.0.6")]
            ),
        )
        await _until(lambda: harness.pods() == ["10.0.0.5", "10.0.0.6"])
        fake.put(SERVICES, service("quotes", "default", 7002))
        await _until(lambda: harness.state.services()["quotes.default"].info.ports[0].port == 7002)

    run(tmp_path, body)


def test_a_server_down_a_while_backs_off_and_keeps_the_endpoints(tmp_path: Path) -> None:
    async def body(harness: Harness) -> None:
        fake = harness.fake
        await _until(lambda: fake.open_watches() == 2)
        fake.stop()
        await _until(lambda: harness.watcher.stats.failures >= 6)
        assert harness.pods() == ["10.0.0.1"]
        fake.start(fake.port)
        fake.put(SLICES, endpoint_slice("q-1", "default", "quotes", 8080, [endpoint("10.0.0.7")]))
        await _until(lambda: harness.pods() == ["10.0.0.7"])

    run(tmp_path, body)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    api: Any = None  # never called: backoff is arithmetic
    watcher = KubeWatcher(api, ClusterState(), lambda: None, backoff_initial=0.2, backoff_max=5.0)
    first = [watcher.backoff(1) for _ in range(50)]
    assert all(0.2 <= d <= 0.4 for d in first) and len(set(first)) > 1
    assert all(0.8 <= watcher.backoff(3) <= 1.0 for _ in range(20))
    assert all(5.0 <= watcher.backoff(20) <= 5.2 for _ in range(20))


def test_no_usable_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: {}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilotfish",
            "control-plane",
            "--config",
            str(mesh),
            "--port",
            "0",
            "--kubernetes",
            "--kubeconfig",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"},
    )
    assert done.returncode == 2, done.stderr
    assert "--kubeconfig: no usable Kubernetes configuration" in done.stderr
