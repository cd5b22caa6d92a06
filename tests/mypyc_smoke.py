"""The compiled build in use: ``python -P tests/mypyc_smoke.py`` exits 1 unless every module
that setup.py compiles with ``PILOTFISH_MYPYC=1`` imports as an extension, not from its source
(``-P``: a checkout's sources in the working directory would shadow an installed build).

Run it before measuring or testing such a build: a run that silently imported the sources
would prove nothing about the compiled code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def compiled_modules() -> list[str]:
    """Module names of setup.py's ``MYPYC_MODULES``."""
    spec = importlib.util.spec_from_file_location("pilotfish_setup", SETUP)
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    paths: list[str] = setup.MYPYC_MODULES
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


def main() -> int:
    interpreted = []
    for name in compiled_modules():
        where = importlib.import_module(name).__file__ or ""
        if not where.endswith(".so"):
            interpreted.append(f"{name} ({where})")
    if interpreted:
        print("not compiled: " + ", ".join(interpreted), file=sys.stderr)
        return 1
    print(f"{len(compiled_modules())} modules compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
