"""The codec conformance suite (test_server_side, test_client_side, and the hostile-input
limits of test_limits) runs on every HTTP/2 codec installed: ours (``python``) and, with the
``fast`` extra, ngh2 (libnghttp2). A test marked ``ours_only`` checks a property of our codec's
implementation (how it batches, when it applies its own SETTINGS), not behaviour the proxy
relies on, and runs on ours alone."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.codec import H2Codec
from tests.codec import factory

CONFORMANCE_MODULES = ("test_server_side", "test_client_side", "test_limits")
CODECS = ["python"] + (["ngh2"] if importlib.util.find_spec("ngh2") is not None else [])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ours_only: a property of our codec, not of HTTP/2")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "codec_impl" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    ours = module not in CONFORMANCE_MODULES or metafunc.definition.get_closest_marker(
        "ours_only"
    )
    metafunc.parametrize("codec_impl", ["python"] if ours else CODECS, indirect=True)


@pytest.fixture(autouse=True)
def codec_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    codec_class: Any = H2Codec
    if name == "ngh2":
        from sidecar.codec.ngh2_codec import Ngh2Codec

        codec_class = Ngh2Codec
    factory.under_test.name, factory.under_test.codec_class = name, codec_class
    try:
        yield name
    finally:
        factory.under_test.name, factory.under_test.codec_class = "python", H2Codec
