"""Envoy matchers built from the mesh model: for the control plane's routes and authorization
policies, and for the sidecar's config dump."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import regex_pb2

from pilotfish.config.matchers import HeaderMatcher


def regex_matcher(pattern: str) -> regex_pb2.RegexMatcher:
    # No engine: RE2 is the default, and `google_re2` is deprecated since v3.0. The mesh
    # parser has already refused what RE2 would not take.
    return regex_pb2.RegexMatcher(regex=pattern)


def header_matcher(h: HeaderMatcher) -> route_components_pb2.HeaderMatcher:
    """One header condition; with no value to compare, the header must be present."""
    matcher = route_components_pb2.HeaderMatcher(name=h.name, invert_match=h.invert)
    if h.exact is not None:
        matcher.string_match.exact = h.exact
    elif h.prefix is not None:
        matcher.string_match.prefix = h.prefix
    elif h.regex is not None:
        matcher.string_match.safe_regex.CopyFrom(regex_matcher(h.regex.pattern))
    else:
        matcher.present_match = h.present if h.present is not None else True
    return matcher
