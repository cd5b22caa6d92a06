"""Suite-wide fixtures."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _kubernetes_schemas_parsed_once() -> Iterator[None]:
    """``kubernetes_validate.validate`` parses its schema files, the shared definitions (a few
    megabytes of JSON) among them, on every call; the tests validate hundreds of objects
    against five Kubernetes versions. The files do not change and the validator never writes
    to what it parsed, so one parse per file serves every call."""
    try:
        from kubernetes_validate import utils
    except ImportError:  # a dev dependency; without it the tests that need it fail on import
        yield
        return
    original = utils.schema_contents
    utils.schema_contents = functools.cache(original)
    try:
        yield
    finally:
        utils.schema_contents = original
