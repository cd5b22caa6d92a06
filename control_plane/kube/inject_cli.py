"""``pilotfish inject -f app.yaml``: the manifests, with the sidecar added, on stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from control_plane.kube.inject import InjectError, InjectOptions, inject_object


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    roots = ""
    if args.ca_address:
        if not args.ca_roots:
            raise InjectError("--ca-address needs --ca-roots (the mesh's root certificates)")
        try:
            with open(args.ca_roots, encoding="ascii") as f:
                roots = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InjectError(f"--ca-roots: {args.ca_roots}: cannot read: {exc}") from None
        if "-----BEGIN CERTIFICATE-----" not in roots:
            raise InjectError(f"--ca-roots: {args.ca_roots}: no PEM certificate in it")
    return InjectOptions(
        image=args.image,
        xds_address=args.xds_address,
        native=not args.classic,
        log_level=args.proxy_log_level,
        ca_address=args.ca_address,
        ca_roots_pem=roots,
        ca_token_audience=args.ca_token_audience,
        trust_domain=args.trust_domain,
    )


def run_inject(args: argparse.Namespace) -> int:
    source = "stdin" if args.filename == "-" else args.filename
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        print(f"pilotfish inject: {source}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        print(f"pilotfish inject: {source}: not valid YAML: {exc}", file=sys.stderr)
        return 2
    try:
        options = options_from_args(args)
    except InjectError as exc:
        print(f"pilotfish inject: {exc}", file=sys.stderr)
        return 2
    out: list[Any] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue  # an empty document (a stray ---)
        try:
            out.append(inject_object(doc, options) if isinstance(doc, dict) else doc)
        except InjectError as exc:
            name = (doc.get("metadata") or {}).get("name", "?")
            print(
                f"pilotfish inject: {source}: document {index} ({doc.get('kind')} {name}): {exc}",
                file=sys.stderr,
            )
            return 2
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False, explicit_start=True))
    return 0
