"""The worker's malloc thresholds: freed payload buffers are reused, not faulted back in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
from sidecar.main import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):
    payloads = [bytes(65536) for _ in range(16)]  # 1 MiB of DATA in flight, then freed
    del payloads
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(
    not os.confstr("CS_GNU_LIBC_VERSION"), reason="mallopt thresholds are glibc's"
)


def page_faults(mode: str, **env: str) -> tuple[str, int]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
        env=child_env, timeout=60,
    )  # fmt: skip
    tuned, faults = done.stdout.split()
    return tuned, int(faults)


@glibc_only
def test_tuned_thresholds_stop_faulting_payload_buffers_back_in() -> None:
    tuned, tuned_faults = page_faults("tuned")
    _, plain_faults = page_faults("plain")
    assert tuned == "True"
    # Untuned, each round trims the freed buffers and faults them back in: thousands of faults.
    assert plain_faults > 2000
    assert tuned_faults < plain_faults // 10


@glibc_only
def test_an_operators_own_thresholds_are_left_alone() -> None:
    tuned, _ = page_faults("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False"
