"""A safe YAML loader that refuses duplicate keys, naming both lines.

YAML says keys are unique, but PyYAML keeps the last of two equal keys without a word: a
service defined twice loses its first definition silently. This loader raises instead.
Merge keys (``<<``) still work: what they bring in may be overridden by the mapping's own keys.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

_BASE: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when present: the pure-Python one takes ~1 s for 1,000 services."""
_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConstructorError):
    pass


class UniqueKeyLoader(_BASE):  # type: ignore[misc, valid-type]  # CSafeLoader has no stubs
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base constructor says why it is refused
            if first is not None:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r} at lines {first} and {line}"
                    " (YAML would silently keep only the last)",
                    key_node.start_mark,
                )
            seen[key] = line
        result: dict[Any, Any] = super().construct_mapping(node, deep)
        return result


def load(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # a safe loader
