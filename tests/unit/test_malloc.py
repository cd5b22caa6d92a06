"""The worker's malloc settings: freed payload buffers are reused, not faulted back in, and
threads share a few arenas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidecar.main import ARENA_MAX

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


ARENAS_CHILD = """
import sys, threading
from sidecar.main import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc()
barrier = threading.Barrier(9)
def work():
    kept = [bytes(4096) for _ in range(64)]  # above pymalloc's 512 bytes: glibc's malloc
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
barrier.wait()
# A thread arena reserves 64 MiB and maps what it does not use yet PROT_NONE; thread stacks'
# guard pages are one page.
arenas = 0
for line in open("/proc/self/maps"):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split("-"))
    if fields[1] == "---p" and len(fields) == 5 and end - start > (1 << 20):
        arenas += 1
barrier.wait()
for thread in threads:
    thread.join()
print(arenas)
"""


def thread_arenas(mode: str, **env: str) -> int:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_CHILD, mode], capture_output=True, text=True, check=True,
        env=child_env, timeout=60,
    )  # fmt: skip
    return int(done.stdout)


@glibc_only
def test_eight_threads_share_one_arena_besides_the_main_one() -> None:
    assert thread_arenas("plain") == 8  # glibc's default: one each, up to eight per core
    assert thread_arenas("tuned") == ARENA_MAX - 1
    assert thread_arenas("tuned", MALLOC_ARENA_MAX="4") == 3  # the operator's setting wins
