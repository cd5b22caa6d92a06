"""``pilotfish demo``: a small local mesh of sample gRPC services, each behind a sidecar.

The work happens in ``pilotfish.demo.runner``; this module stays light because every demo
service process (``python -m pilotfish.demo.services``) imports it first.
"""

from __future__ import annotations

import argparse


def run_demo(args: argparse.Namespace) -> int:
    from pilotfish.demo.runner import DemoOptions, run

    return run(DemoOptions(duration=args.duration, rate=args.rate))
