"""Header matchers, shared by route matching and route policies (fault injection)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pilotfish.config.fields import Node


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Matches one request header. Exactly one of exact/prefix/regex/present is set."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool | None = None
    invert: bool = False

    def matches(self, value: str | None) -> bool:
        if self.present is not None:
            result = (value is not None) == self.present
        elif value is None:
            result = False
        elif self.exact is not None:
            result = value == self.exact
        elif self.prefix is not None:
            result = value.startswith(self.prefix)
        elif self.regex is not None:
            result = self.regex.fullmatch(value) is not None
        else:
            result = True
        return result != self.invert


def parse_header_matcher(node: Node) -> HeaderMatcher:
    node.mapping({"name", "exact", "prefix", "regex", "present", "invert"})
    kinds = [k for k in ("exact", "prefix", "regex", "present") if node.has(k)]
    if len(kinds) > 1:
        raise node.error("at most one of exact, prefix, regex, present")
    name = node.require("name").as_str().lower()
    invert = node.get("invert").as_bool(False)
    if not kinds:
        return HeaderMatcher(name=name, present=True, invert=invert)
    kind = kinds[0]
    if kind == "exact":
        return HeaderMatcher(name=name, exact=str(node.get("exact").value), invert=invert)
    if kind == "prefix":
        return HeaderMatcher(name=name, prefix=node.get("prefix").as_str(), invert=invert)
    if kind == "regex":
        return HeaderMatcher(name=name, regex=node.get("regex").as_regex(), invert=invert)
    return HeaderMatcher(name=name, present=node.get("present").as_bool(), invert=invert)
