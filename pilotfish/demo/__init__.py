"""``pilotfish demo``: a small local mesh of sample gRPC services, each behind a sidecar.

The work happens in ``pilotfish.demo.runner``; this module stays light because every demo
service process (``python -m pilotfish.demo.services``) imports it first.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping


def otlp_endpoint(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--otlp-endpoint``, else the standard ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``."""
    env = os.environ if environ is None else environ
    for candidate in (
        flag,
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def run_demo(args: argparse.Namespace) -> int:
    from pilotfish.demo.runner import DemoOptions, run

    return run(
        DemoOptions(
            duration=args.duration,
            rate=args.rate,
            otlp_endpoint=otlp_endpoint(args.otlp_endpoint),
            keep=args.keep,
        )
    )
