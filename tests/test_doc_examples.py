"""Every whole-file YAML example in README.md and docs/ passes ``pilotfish validate``."""

from __future__ import annotations

import pytest

from control_plane.validate import validate_text
from tests.doc_examples import Example, whole_file_examples

EXAMPLES = whole_file_examples()


def test_the_docs_have_examples_of_both_kinds() -> None:
    kinds = {validate_text(e.text).kind for e in EXAMPLES}
    assert kinds == {"mesh file", "sidecar bootstrap"}
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_is_valid(example: Example) -> None:
    report = validate_text(example.text)
    assert report.findings == (), [f.format(example.name) for f in report.findings]
