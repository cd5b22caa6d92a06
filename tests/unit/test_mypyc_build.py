"""setup.py's compiled build option (``PILOTFISH_MYPYC=1``), as far as a pure install sees it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.mypyc_smoke import SETUP, compiled_modules


def _setup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pilotfish_setup", SETUP)
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup


def test_without_the_variable_the_build_is_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILOTFISH_MYPYC", raising=False)
    assert _setup().mypyc_build() == {}


def test_every_compiled_module_exists_and_is_on_the_request_path() -> None:
    """A module renamed or moved must be renamed in the list too: mypyc would fail the build."""
    repo = SETUP.parent
    names = compiled_modules()
    assert len(names) == len(set(names)) > 0
    for path in _setup().MYPYC_MODULES:
        assert (repo / path).is_file(), path
        assert Path(path).parts[0] == "sidecar", path
