"""docs/sidecar-bootstrap.md and the bootstrap parser agree: the page's complete example reaches
every block the parser reads, and the page names every field the parser accepts there."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.fields import Node
from tests.doc_examples import ROOT, yaml_blocks

DOC = ROOT / "docs" / "sidecar-bootstrap.md"
# Every block of the bootstrap, as a field path with list indexes dropped.
BLOCKS = {
    "", "admin", "tracing", "access_log", "listeners[]", "listeners[].tcp_passthrough",
    "listeners[].limits",
    "listeners[].load_shedding", "route_configs[]", "route_configs[].virtual_hosts[]",
    "route_configs[].virtual_hosts[].request_headers_to_add[]",
    "route_configs[].virtual_hosts[].routes[]",
    "route_configs[].virtual_hosts[].routes[].match",
    "route_configs[].virtual_hosts[].routes[].match.headers[]",
    "route_configs[].virtual_hosts[].routes[].route",
    "route_configs[].virtual_hosts[].routes[].retry",
    "route_configs[].virtual_hosts[].routes[].retry.backoff",
    "route_configs[].virtual_hosts[].routes[].rate_limit",
    "route_configs[].virtual_hosts[].routes[].rate_limit.per_caller",
    "route_configs[].virtual_hosts[].routes[].fault",
    "route_configs[].virtual_hosts[].routes[].fault.delay",
    "route_configs[].virtual_hosts[].routes[].fault.abort",
    "route_configs[].virtual_hosts[].routes[].fault.header",
    "route_configs[].virtual_hosts[].routes[].fallback",
    "route_configs[].virtual_hosts[].routes[].fallback.response",
    "clusters[]", "clusters[].endpoints[]", "clusters[].load_balancing",
    "clusters[].health_check", "clusters[].outlier_detection", "clusters[].circuit_breakers",
    "clusters[].retry_budget", "clusters[].adaptive_throttling",
}


def complete_example() -> str:
    (example,) = [b for b in yaml_blocks(DOC) if b.text.startswith("node_id: edge-1")]
    return example.text


def accepted_fields(document: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """What ``Node.mapping`` allowed at each block the parser read in ``document``."""
    seen: dict[str, set[str]] = {}
    original = Node.mapping

    def recording(node: Node, allowed: set[str] | None = None) -> Node:
        if allowed is not None:
            seen.setdefault(re.sub(r"\[\d+\]", "[]", node.path), set()).update(allowed)
        return original(node, allowed)

    monkeypatch.setattr(Node, "mapping", recording)
    parse_bootstrap(document)
    return seen


def test_the_example_reaches_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = accepted_fields(yaml.safe_load(complete_example()), monkeypatch)
    assert set(seen) >= BLOCKS, sorted(BLOCKS - set(seen))


def unnamed(seen: dict[str, set[str]], text: str) -> set[str]:
    named = set(re.findall(r"`([a-z0-9_]+)", text)) | set(re.findall(r"([a-z0-9_]+):", text))
    return {f"{block}.{field}" for block, fields in seen.items() for field in fields
            if field not in named}


def test_the_page_names_every_accepted_field(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = accepted_fields(yaml.safe_load(complete_example()), monkeypatch)
    text = DOC.read_text(encoding="utf-8")
    assert not unnamed(seen, text), sorted(unnamed(seen, text))
    # A field the page stopped naming is reported with its block.
    assert unnamed(seen, text.replace("cpu_decay", "")) == {"listeners[].load_shedding.cpu_decay"}
