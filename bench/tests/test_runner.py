"""The run loop's bookkeeping: a target that does not start, the idle figure of one that does
(no processes are started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.procs import Pinning, StartError
from bench.runner import BenchResult, Failure, Upstreams, _GroupRun
from bench.targets import Running, Upstream
from bench.tests.test_report import _result


class _NoUpstreams(Upstreams):
    def get(self, kind: str) -> Upstream:
        return Upstream(kind=kind, port=1, proc=_NeverSpawned())  # type: ignore[arg-type]

    def serving(self, kind: str, port: int | None) -> bool:
        return True


class _NeverSpawned:
    def exited(self) -> None:
        return None


class _Broken:
    name = "broken"
    is_proxy = True

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        return []

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        raise StartError("broken exited with status 1\nTraceback: no sidecar")


def test_target_that_does_not_start_fails_every_workload_once(tmp_path: Path) -> None:
    result: BenchResult = _result()
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    group_run = _GroupRun(
        result=result, run=0, target=_Broken(), kind="h2",
        upstreams=_NoUpstreams(pinning, tmp_path, result), pinning=pinning, workdir=tmp_path,
        log=lambda _: None,
    )
    assert group_run.measure(list(result.workloads)) is False
    for workload in result.workloads:
        outcomes = result.outcomes_for("broken", workload.key)
        assert outcomes == [Failure("did not start: broken exited with status 1")]
    assert any("**broken** did not start" in note for note in result.notes)


class _ThisProcess:
    """Stands for a started proxy: this test's own process, which is running."""

    pid = os.getpid()

    def exited(self) -> None:
        return None

    def stop(self) -> None:
        return None


class _Starts:
    name = "starts"
    is_proxy = True

    def command(self, upstream_port: str, listen_port: str, config_file: str) -> list[str]:
        return []

    def start(self, upstream_port: int, pinning: Pinning, workdir: Path) -> Running:
        return Running(port=upstream_port, proc=_ThisProcess(), readiness="test")  # type: ignore[arg-type]


def test_idle_rss_is_sampled_once_per_start_before_any_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled: list[int] = []

    def idle(pid: int) -> int:
        sampled.append(pid)
        return 30 * 2**20

    monkeypatch.setattr("bench.runner.idle_rss_bytes", idle)
    result = _result()
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    group_run = _GroupRun(
        result=result, run=0, target=_Starts(), kind="h2",
        upstreams=_NoUpstreams(pinning, tmp_path, result), pinning=pinning, workdir=tmp_path,
        log=lambda _: None,
    )
    group_run._ensure_started()
    group_run._ensure_started()  # still running: neither started nor sampled again
    assert sampled == [os.getpid()]
    assert result.idle_rss == {"starts": [30 * 2**20]}
