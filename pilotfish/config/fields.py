"""Typed readers for YAML documents whose errors name the path of the bad field.

Used by the sidecar bootstrap loader and the control plane's mesh file loader alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pilotfish.config.errors import ConfigError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(path: str, value: object) -> float:
    """``250ms``, ``2s``, ``1.5m`` or ``1h`` → seconds."""
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ConfigError(path, "expected a duration like 250ms")


def parse_address(path: str, value: object) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    if isinstance(value, str):
        host, sep, port_text = value.rpartition(":")
        if sep and host and port_text.isdigit():
            port = int(port_text)
            if 0 < port < 65536:
                return host.strip("[]"), port
    raise ConfigError(path, "expected an address like 127.0.0.1:8080")


def re2_problem(pattern: str) -> str | None:
    """Why RE2 refuses ``pattern``, or None if it compiles."""
    # Loaded with the first regex: RE2's library is 2.5 MB resident that a config without
    # regexes (most sidecars) never needs.
    import re2

    options = re2.Options()
    options.log_errors = False  # errors come back as exceptions; RE2's own log is noise
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return None


def yaml_error_location(exc: Exception) -> tuple[int, int, str]:
    """(line, column, message) of a PyYAML error, 1-based (0, 0 when it has no position); the
    message without PyYAML's ``in "<unicode string>"`` lines, since the caller names the file."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"not valid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return 0, 0, message
    return mark.line + 1, mark.column + 1, message


def yaml_error(source: str, exc: Exception) -> ConfigError:
    line, column, message = yaml_error_location(exc)
    where = f"{source}:{line}:{column}" if line else source
    return ConfigError("", f"{where}: {message}")


class Node:
    """A value inside a YAML document, together with its path for error messages."""

    __slots__ = ("path", "value")

    def __init__(self, path: str, value: Any) -> None:
        self.path = path
        self.value = value

    def _child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path, message)

    def mapping(self, allowed: set[str] | None = None) -> Node:
        if not isinstance(self.value, dict):
            raise self.error("expected a mapping")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {key!r}")
            if allowed is not None and key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise ConfigError(self._child_path(key), f"unknown field (expected one of: {hint})")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and self.value.get(key) is not None

    def get(self, key: str) -> Node:
        value = self.value.get(key) if isinstance(self.value, dict) else None
        return Node(self._child_path(key), value)

    def require(self, key: str) -> Node:
        if not self.has(key):
            raise ConfigError(self._child_path(key), "required field is missing")
        return self.get(key)

    def items(self) -> Iterator[tuple[str, Node]]:
        self.mapping()
        for key, value in self.value.items():
            yield key, Node(self._child_path(key), value)

    def elements(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            raise self.error("expected a list")
        for i, value in enumerate(self.value):
            yield Node(self._child_path(i), value)

    def as_str(self, default: str | None = None) -> str:
        if self.value is None and default is not None:
            return default
        if not isinstance(self.value, str) or not self.value:
            raise self.error("expected a non-empty string")
        return self.value

    def as_int(
        self, default: int | None = None, minimum: int = 0, maximum: int | None = None
    ) -> int:
        if self.value is None and default is not None:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error("expected an integer")
        if self.value < minimum or (maximum is not None and self.value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self.error(f"expected an integer at least {minimum}{upper}")
        return self.value

    def as_bool(self, default: bool | None = None) -> bool:
        if self.value is None and default is not None:
            return default
        if not isinstance(self.value, bool):
            raise self.error("expected true or false")
        return self.value

    def as_duration(self, default: float | None = None) -> float:
        if self.value is None and default is not None:
            return default
        return parse_duration(self.path, self.value)

    def as_regex(self) -> re.Pattern[str]:
        """A regex in RE2 syntax (what Envoy and gRPC compile: no lookaround, no
        backreferences), compiled by Python's ``re`` for the sidecar's own matching."""
        text = self.as_str()
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise self.error(f"invalid regular expression: {exc}") from None
        problem = re2_problem(text)
        if problem is not None:
            raise self.error(f"not RE2 syntax, which Envoy and gRPC require: {problem}")
        return pattern

    def as_choice(self, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.as_str(default)
        if value not in choices:
            raise self.error(f"expected one of: {', '.join(choices)}")
        return value
