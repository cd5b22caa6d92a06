"""Generate Python code for our own gRPC APIs under ``protos/`` into ``pilotfish/gen``.

``python -m pilotfish.genproto`` regenerates; ``--check`` fails when the committed code is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "pilotfish" / "gen"


def _generate(out: Path) -> None:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if not sources:
        return
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # grpc_tools writes absolute imports ("from pilotfish.demo.v1 import ..."); our code lives
    # under pilotfish.gen, so rewrite them to that package.
    for path in out.rglob("*.py"):
        text = path.read_text()
        text = text.replace("from pilotfish.", "from pilotfish.gen.pilotfish.")
        text = text.replace("import pilotfish.", "import pilotfish.gen.pilotfish.")
        path.write_text(text)
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def _tree(path: Path) -> set[str]:
    return {
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if pilotfish/gen is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _generate(fresh)
        if args.check:
            stale = sorted(
                name
                for name in _tree(fresh) | _tree(OUT)
                if not (OUT / name).exists()
                or not (fresh / name).exists()
                or not filecmp.cmp(fresh / name, OUT / name, shallow=False)
            )
            if stale:
                print("pilotfish/gen is stale; run: python -m pilotfish.genproto", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(fresh, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
