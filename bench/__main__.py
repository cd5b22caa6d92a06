"""``python -m bench``: measure direct, Pilotfish and nghttpx, and rewrite docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from bench.h2load import H2LOAD
from bench.report import raw_json, render_markdown
from bench.runner import run_benchmark, stderr_log
from bench.targets import (
    NGHTTPD,
    NGHTTPX,
    REPO,
    Direct,
    Nghttpx,
    Pilotfish,
    PilotfishTcp,
    Target,
    mypyc_python,
)
from bench.workloads import WORKLOADS, Settings

TARGETS: dict[str, Target] = {
    "direct": Direct(),
    "pilotfish": Pilotfish(workers=1),
    "pilotfish-python-codec": Pilotfish(workers=1, codec="python"),
    # The request path compiled with mypyc (README.md); in the default run only when
    # its interpreter exists.
    "pilotfish-mypyc": Pilotfish(workers=1, mypyc=True),
    "pilotfish-mypyc-python-codec": Pilotfish(workers=1, codec="python", mypyc=True),
    "pilotfish2": Pilotfish(workers=2),
    "pilotfish2-all-cpus": Pilotfish(workers=2, all_cpus=True),
    "pilotfish-tcp": PilotfishTcp(),
    "nghttpx": Nghttpx(),
}
DEBIAN_PACKAGES = {H2LOAD: "nghttp2-client", NGHTTPD: "nghttp2-server", NGHTTPX: "nghttp2-proxy"}




def _default_targets() -> list[str]:
    compiled = os.access(mypyc_python(), os.X_OK)
    return [name for name in TARGETS if compiled or "mypyc" not in name]


def _pick(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median shown)")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of each measured load run"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 run of short loads (about 20-40 s)"
    )
    parser.add_argument(
        "--targets", default=",".join(_default_targets()),
        help=f"comma-separated, from {', '.join(TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--workloads", default=",".join(w.key for w in WORKLOADS),
        help=f"comma-separated, from {', '.join(w.key for w in WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--max-requests", type=int, default=2_000_000,
        help="upper bound on requests in one load run",
    )
    parser.add_argument(
        "--noise-retries", type=int, default=1,
        help="measure again (at most this often) when other processes kept the proxy's core "
        "more than 10%% busy",
    )
    parser.add_argument(
        "--output", default=str(REPO / "docs" / "benchmarks.md"),
        help="markdown report to write (default: docs/benchmarks.md)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target_names = _pick(args.targets, list(TARGETS), "target")
        workload_keys = _pick(args.workloads, [w.key for w in WORKLOADS], "workload")
    except argparse.ArgumentTypeError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    missing = [f"{tool} (apt-get install -y {pkg})" for tool, pkg in DEBIAN_PACKAGES.items()
               if not os.access(tool, os.X_OK)]
    if shutil.which("taskset") is None:
        missing.append("taskset (apt-get install -y util-linux)")
    if missing:
        print("python -m bench: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    if args.runs < 1 or args.duration <= 0:
        print("python -m bench: --runs must be ≥ 1 and --duration > 0", file=sys.stderr)
        return 2
    settings = (
        Settings(runs=1, duration_s=0.5, probe_s=0.1, max_requests=args.max_requests,
                 grpc_warmup_calls=50, noise_retries=0)
        if args.quick
        else Settings(runs=args.runs, duration_s=args.duration, probe_s=0.4,
                      max_requests=args.max_requests, grpc_warmup_calls=300,
                      noise_retries=args.noise_retries)
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = REPO / "bench" / "results" / stamp
    workdir.mkdir(parents=True)
    stderr_log(f"logs and raw results in {workdir}")
    result = run_benchmark(
        settings=settings,
        targets=[TARGETS[name] for name in target_names],
        workloads=[w for w in WORKLOADS if w.key in workload_keys],
        workdir=workdir,
        invocation=[sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        log=stderr_log,
    )
    (workdir / "results.json").write_text(raw_json(result), encoding="utf-8")
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(render_markdown(result))
    stderr_log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
