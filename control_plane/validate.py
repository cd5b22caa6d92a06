"""``pilotfish validate``: every error of a mesh file or a sidecar bootstrap, with its line.

The parsers stop at the first bad field. To report every one in a run, the checker parses,
records the error, sets aside the top-level item the error is in (a service, a listener, a
cluster...) and parses again, until the rest is clean. A set-aside item that others refer to
is replaced by a minimal valid stand-in of the same name, so that its users are not reported
for naming it. Each error's field path is mapped back to the line and column of the YAML
node it names (the key of a mapping entry, or the list element).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pilotfish.config import yaml_loader
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import yaml_error_location

# A stand-in keeps its name and is valid whatever refers to it.
_STUB_ENDPOINT = "127.0.0.1:9"
_BOOTSTRAP_KEYS = frozenset({"listeners", "route_configs", "clusters", "admin", "node_id"})
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
MAX_ERRORS = 100


@dataclass(frozen=True)
class Finding:
    line: int  # 1-based; 0 when unknown
    column: int
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}:{self.column}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(frozen=True)
class Report:
    kind: str  # "mesh file" or "sidecar bootstrap"
    findings: tuple[Finding, ...]
    summary: str  # what a clean file holds, e.g. "3 services"
    notes: tuple[str, ...] = ()
    """Not errors: what gRPC's proxyless clients ignore of a clean mesh file."""


def yaml_error_finding(exc: yaml.YAMLError) -> Finding:
    line, column, message = yaml_error_location(exc)
    return Finding(line, column, "", message)


def _positions(node: yaml.Node | None, path: str, out: dict[str, tuple[int, int]]) -> None:
    if node is None:
        return
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = str(key.value)
            child = f"{path}.{name}" if path else name
            out[child] = (key.start_mark.line + 1, key.start_mark.column + 1)
            _positions(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            child = f"{path}[{i}]"
            out[child] = (value.start_mark.line + 1, value.start_mark.column + 1)
            _positions(value, child, out)


def _locate(path: str, positions: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The position of ``path``, or of its nearest ancestor in the file (a missing field is
    reported where its parent is)."""
    while path:
        if path in positions:
            return positions[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return (1, 1)


def _top_item(path: str) -> tuple[str, ...]:
    """The first two parts of a field path: ``services.quotes.routes[0]`` -> ("services",
    "quotes"); ``listeners[2].address`` -> ("listeners", "2")."""
    parts = [m.group(1) or m.group(2) for m in _PATH_PART.finditer(path)]
    return tuple(parts[:2])


def _set_aside_mesh(document: dict[str, Any], item: tuple[str, ...]) -> bool:
    if item[:1] == ("services",) and len(item) == 2:
        services = document.get("services")
        if isinstance(services, dict) and item[1] in services:
            if services[item[1]] == {"endpoints": [_STUB_ENDPOINT]}:
                del services[item[1]]  # the stand-in did not help: the name itself is bad
            else:
                services[item[1]] = {"endpoints": [_STUB_ENDPOINT]}
            return True
    if item and item[0] in document and item[0] != "services":
        del document[item[0]]
        return True
    return False


def _set_aside_bootstrap(document: dict[str, Any], item: tuple[str, ...]) -> bool:
    if len(item) == 2 and item[1].isdigit() and isinstance(document.get(item[0]), list):
        entries: list[Any] = document[item[0]]
        index = int(item[1])
        if index >= len(entries):
            return False
        old = entries[index]
        name = old.get("name") if isinstance(old, dict) else None
        stub: dict[str, Any] | None = None
        if isinstance(name, str) and item[0] == "clusters":
            stub = {"name": name, "endpoints": [_STUB_ENDPOINT]}
        elif isinstance(name, str) and item[0] == "route_configs":
            stub = {"name": name, "virtual_hosts": []}
        if stub is None or old == stub:
            # A listener (nothing refers to one) or an entry without a usable name.
            entries.pop(index)
        else:
            entries[index] = stub
        return True
    if item and item[0] in document:
        if item[0] == "listeners":
            document[item[0]] = []
        else:
            del document[item[0]]
        return True
    return False


def _collect(
    document: dict[str, Any],
    parse: Callable[[Any], str],
    set_aside: Callable[[dict[str, Any], tuple[str, ...]], bool],
    positions: dict[str, tuple[int, int]],
) -> tuple[list[Finding], str]:
    findings: list[Finding] = []
    summary = ""
    # The parsers read item by item, so each round finds a new error or ends.
    while len(findings) < MAX_ERRORS:
        try:
            summary = parse(document)
        except ConfigError as exc:
            line, column = _locate(exc.path, positions)
            finding = Finding(line, column, exc.path, exc.message)
            if finding not in findings:
                findings.append(finding)
            if not set_aside(document, _top_item(exc.path)):
                break
        except ValueError as exc:  # a consistency check across items: no path to set aside
            findings.append(Finding(0, 0, "", str(exc)))
            break
        else:
            break
    findings.sort(key=lambda f: (f.line == 0, f.line, f.column))
    return findings, summary


def _parse_mesh(document: Any) -> str:
    from control_plane.mesh import parse_mesh
    from control_plane.xds.cache import SnapshotCache

    mesh = parse_mesh(document)
    SnapshotCache(mesh)  # every proxy's view must be consistent (raises InconsistentSnapshot)
    return f"{len(mesh.services)} services"


def _parse_bootstrap(document: Any) -> str:
    from pilotfish.config.bootstrap import parse_bootstrap

    bootstrap = parse_bootstrap(document)
    return (
        f"{len(bootstrap.listeners)} listeners, {len(bootstrap.route_configs)} route configs, "
        f"{len(bootstrap.clusters)} clusters"
    )


def is_bootstrap(document: Any) -> bool:
    """A sidecar bootstrap, not a mesh file: bootstrap keys and no ``services``."""
    return (
        isinstance(document, dict)
        and "services" not in document
        and bool(_BOOTSTRAP_KEYS & set(document))
    )


def validate_text(text: str) -> Report:
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        # Refuses a key written twice (naming both lines): YAML would keep only the last.
        document = yaml_loader.load(text)
    except yaml.YAMLError as exc:
        return Report("YAML file", (yaml_error_finding(exc),), "")
    positions: dict[str, tuple[int, int]] = {}
    _positions(tree, "", positions)
    if is_bootstrap(document):
        findings, summary = _collect(document, _parse_bootstrap, _set_aside_bootstrap, positions)
        return Report("sidecar bootstrap", tuple(findings), summary)
    if not isinstance(document, dict):
        return Report("mesh file", (Finding(1, 1, "", "expected a mapping with `services`"),), "")
    findings, summary = _collect(document, _parse_mesh, _set_aside_mesh, positions)
    notes: tuple[str, ...] = ()
    if not findings:
        from control_plane.mesh import parse_mesh
        from control_plane.proxyless import ignored_by_proxyless

        lines = ignored_by_proxyless(parse_mesh(document))
        notes = tuple(f"proxyless gRPC clients ignore {line}" for line in lines)
    return Report("mesh file", tuple(findings), summary, notes)


def validate_file(path: str | Path) -> Report:
    return validate_text(Path(path).read_text(encoding="utf-8"))
