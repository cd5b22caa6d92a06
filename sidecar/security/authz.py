"""Authorization: a pure function from (peer, request, JWT claims) to allow or deny.

DENY rules are checked first and any match refuses. Then, if the policy has ALLOW rules, one of
them must match; a policy with only DENY rules allows everything else. The decision names the
rule that made it, for the access log and the debug header.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pilotfish.config.security import AuthorizationPolicy, AuthzRule
from pilotfish.identity import SpiffeId


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    principal: SpiffeId | None
    """The peer's verified SPIFFE ID; None for a plaintext (PERMISSIVE) peer."""
    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-case names; repeated headers joined with ','."""
    claims: Mapping[str, Any] | None = None
    """Verified JWT claims, None when the request carried no (valid) token."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    """``deny[0]``, ``allow[2]``, ``no allow rule matched`` or ``no policy``."""


ALLOW_ALL = Decision(True, "no policy")


def claim_values(claims: Mapping[str, Any] | None, name: str) -> tuple[str, ...]:
    """A claim as strings; ``a.b`` reads nested objects. Absent or non-string: no values."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ()
        value = value[part]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, int | float):
        return (str(value),)
    return ()


def rule_matches(rule: AuthzRule, request: RequestAttributes) -> bool:
    principal = request.principal
    uri = principal.uri if principal is not None else None
    if rule.authenticated is not None and (principal is not None) != rule.authenticated:
        return False
    if rule.principals and (uri is None or not any(p.matches(uri) for p in rule.principals)):
        return False
    if rule.not_principals and uri is not None and any(
        p.matches(uri) for p in rule.not_principals
    ):
        return False
    if rule.namespaces and (principal is None or principal.namespace not in rule.namespaces):
        return False
    path = request.path.partition("?")[0]
    if rule.paths and not any(p.matches(path) for p in rule.paths):
        return False
    if rule.not_paths and any(p.matches(path) for p in rule.not_paths):
        return False
    if rule.methods and request.method.upper() not in rule.methods:
        return False
    if rule.headers and not all(h.matches(request.headers.get(h.name)) for h in rule.headers):
        return False
    for claim, accepted in rule.claims:
        if not set(claim_values(request.claims, claim)) & set(accepted):
            return False
    return True


def authorize(policy: AuthorizationPolicy | None, request: RequestAttributes) -> Decision:
    if policy is None:
        return ALLOW_ALL
    for i, rule in enumerate(policy.deny):
        if rule_matches(rule, request):
            return Decision(False, f"deny[{i}]")
    if not policy.allow:
        return Decision(True, "no allow rules")
    for i, rule in enumerate(policy.allow):
        if rule_matches(rule, request):
            return Decision(True, f"allow[{i}]")
    return Decision(False, "no allow rule matched")
