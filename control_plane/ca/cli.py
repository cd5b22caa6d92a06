"""``pilotfish ca-root stage|activate|retire``: the three steps of a root rotation.

Each step changes the files in ``--ca-dir``; the control plane reads them when it starts, so
restart it after each step (see ``control_plane.ca.store`` for why three steps).
"""

from __future__ import annotations

import argparse
import sys
import time

from control_plane.ca.store import (
    CaStoreError,
    activate_next_root,
    retire_previous_roots,
    stage_next_root,
)

MESSAGES = {
    "stage": "next root staged: trusted from the next start on, not signing yet",
    "activate": "next root activated: it signs from the next start on; the old one stays trusted",
    "retire": "previous roots retired: no longer trusted from the next start on",
}


def run_ca_root(args: argparse.Namespace) -> int:
    try:
        if args.step == "stage":
            stage_next_root(args.ca_dir, args.trust_domain, time.time())
        elif args.step == "activate":
            activate_next_root(args.ca_dir)
        else:
            retire_previous_roots(args.ca_dir)
    except (CaStoreError, OSError) as exc:
        print(f"pilotfish ca-root {args.step}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.ca_dir}: {MESSAGES[args.step]}; restart the control plane")
    return 0
