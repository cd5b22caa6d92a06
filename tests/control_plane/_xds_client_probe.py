"""Run by test_proxyless.py in its own process: gRPC keeps the first xDS bootstrap it reads.

Usage: GRPC_XDS_BOOTSTRAP=bootstrap.json python _xds_client_probe.py TARGET CALLS METHOD...

Each round calls every METHOD CALLS times on one channel to ``xds:///TARGET``, counts the
replies (each backend answers its own name) and prints one JSON line
``{"METHOD": {"backend": count}}``. Then it reads a line from stdin: ``again`` runs another
round on the same channel (to observe pushed config), anything else (or EOF) exits.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import grpc

MAX_ROUNDS = 20


def main(argv: list[str]) -> int:
    target, calls, methods = argv[0], int(argv[1]), argv[2:]
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        for _ in range(MAX_ROUNDS):
            result: dict[str, dict[str, int]] = {}
            for method in methods:
                call = channel.unary_unary(method)
                counts: Counter[str] = Counter()
                for _ in range(calls):
                    counts[call(b"", timeout=10, wait_for_ready=True).decode()] += 1
                result[method] = dict(counts)
            print(json.dumps(result), flush=True)
            if sys.stdin.readline().strip() != "again":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
