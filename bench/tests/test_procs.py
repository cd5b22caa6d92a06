"""/proc sampling of the processes the harness starts."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.procs import idle_rss_bytes, process_tree, rss_bytes


def test_idle_rss_sums_the_whole_process_tree() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Measured only once it runs: just after the fork it is not yet an interpreter's size.
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        assert child.pid in process_tree(os.getpid())
        alone = rss_bytes([os.getpid()])
        idle = idle_rss_bytes(os.getpid(), settle_s=0)
        # The child is a whole interpreter: several MB on top of this process alone.
        assert idle > alone + 2 * 2**20
    finally:
        child.kill()
        child.wait()
