"""The exchange's stages combine into one class: each method has exactly one owner.

``Exchange`` is assembled from stage classes over one shared state, so a method that two
stages both define would silently shadow the other by base-class order, and a hand-off the
state declares (for type checking only) but no stage defines would fail only when a request
first takes that path.
"""

from __future__ import annotations

import ast
import inspect

from sidecar.route import state
from sidecar.route.exchange import Exchange
from sidecar.route.finish import Finisher
from sidecar.route.relay import ResponseRelay
from sidecar.route.state import ExchangeState
from sidecar.route.tries import TryOrchestrator

STAGES: tuple[type, ...] = (Exchange, TryOrchestrator, ResponseRelay, Finisher, ExchangeState)


def own_functions(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if inspect.isfunction(value) or isinstance(value, property)
    }


def declared_handoffs() -> set[str]:
    """The methods ``ExchangeState`` declares under ``TYPE_CHECKING`` (as stubs or as callable
    attributes) for the stages to define."""
    tree = ast.parse(inspect.getsource(state))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExchangeState"]
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            names |= {
                f.target.id
                for f in node.body
                if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)
            }
    return names


def test_no_method_is_defined_by_two_stages() -> None:
    owners: dict[str, list[str]] = {}
    for cls in STAGES:
        for name in own_functions(cls):
            owners.setdefault(name, []).append(cls.__name__)
    shared = {name: classes for name, classes in owners.items() if len(classes) > 1}
    assert shared == {}


def test_every_declared_handoff_is_defined_by_one_stage() -> None:
    handoffs = declared_handoffs()
    assert {"_fail", "_finish", "_cancel_attempt", "_maybe_retry", "_route_to"} <= handoffs
    for name in sorted(handoffs):
        owners = [cls.__name__ for cls in STAGES if name in vars(cls)]
        assert len(owners) == 1, (name, owners)
        # What the state declares is only a declaration: the stage's definition is what runs.
        assert name not in vars(ExchangeState)
        assert getattr(Exchange, name) is vars(next(c for c in STAGES if name in vars(c)))[name]


def test_the_exchange_is_a_try_owner_for_its_attempts() -> None:
    # An Attempt reports to its exchange through these; each must resolve to a stage's method.
    for name in (
        "attempt_connected",
        "attempt_failed",
        "attempt_reset",
        "response_headers",
        "response_data",
        "response_trailers",
        "end_try_span",
    ):
        assert inspect.isfunction(getattr(Exchange, name)), name
