"""docs/xds-compatibility.md names every key the mesh parser accepts, and no other."""

from __future__ import annotations

import re

import pytest

from control_plane.mesh import load_mesh_file
from pilotfish.config.fields import Node
from tests.control_plane.test_outbound_xds import EVERY_FEATURE
from tests.doc_examples import ROOT

DOC = ROOT / "docs" / "xds-compatibility.md"


def normalized(path: str) -> str:
    """A block's path as the table writes it: list indexes, service and provider names, and
    allow/deny (one rule shape) replaced by placeholders."""
    path = re.sub(r"\[\d+\]", "[]", path)
    path = re.sub(r"^services\.[^.\[]+", "services.<s>", path)
    path = re.sub(r"^security\.jwt_providers\.[^.]+", "security.jwt_providers.<p>", path)
    path = re.sub(r"\.authorization\.(allow|deny)\[\]", r".authorization.<allow|deny>[]", path)
    return path or "(top level)"


def accepted_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """What ``Node.mapping`` allowed at each block the parser read in the every-feature mesh."""
    seen: dict[str, set[str]] = {}
    original = Node.mapping

    def recording(node: Node, allowed: set[str] | None = None) -> Node:
        if allowed is not None:
            seen.setdefault(normalized(node.path), set()).update(allowed)
        return original(node, allowed)

    monkeypatch.setattr(Node, "mapping", recording)
    load_mesh_file(EVERY_FEATURE)
    return seen


def documented_keys() -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    in_table = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| Block | Keys |"):
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            in_table = in_table and line.startswith("|")
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if set(cells[0]) <= {"-"}:
            continue
        block = cells[0].strip("`").replace("\\|", "|")
        rows.setdefault(block, set()).update(re.findall(r"`([^`]+)`", cells[1]))
        assert all(cells[2:5]), f"{block}: a client's column is empty"
    return rows


def test_every_accepted_key_is_in_the_table_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted, documented = accepted_keys(monkeypatch), documented_keys()
    missing = {b: sorted(k - documented.get(b, set())) for b, k in accepted.items()}
    assert {b: k for b, k in missing.items() if k} == {}
    stale = {b: sorted(k - accepted.get(b, set())) for b, k in documented.items()}
    assert {b: k for b, k in stale.items() if k} == {}


def test_the_page_is_linked_from_the_readme_and_the_architecture() -> None:
    for page in ("README.md", "docs/architecture.md", "docs/mesh-reference.md"):
        assert "xds-compatibility.md" in (ROOT / page).read_text(encoding="utf-8"), page
