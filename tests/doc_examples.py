"""The YAML examples of README.md and docs/*.md that are whole files (a mesh file or a sidecar
bootstrap), for tests and for CI to run ``pilotfish validate`` on.

``python -m tests.doc_examples DIR`` writes each one to DIR as ``<doc>-<line>.yaml``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
# Placeholders the benchmark notes use for ports chosen at run time.
_PORT_PLACEHOLDER = re.compile(r"\b[A-Z]+_PORT\b")
_WHOLE_FILE_KEYS = frozenset({"services", "listeners"})


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # of the first YAML line
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc.stem}-{self.line}.yaml"


def yaml_blocks(doc: Path) -> list[Example]:
    blocks: list[Example] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    start: int | None = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```yaml":
            start = number + 1
        elif start is not None and line.strip() == "```":
            blocks.append(Example(doc, start, "\n".join(lines[start - 1 : number - 1]) + "\n"))
            start = None
    return blocks


def whole_file_examples() -> list[Example]:
    """Blocks that are whole files: top-level ``services`` or ``listeners``, and no ``[...]``
    (the elision marker of excerpts)."""
    found = []
    for doc in DOCS:
        for block in yaml_blocks(doc):
            if "[...]" in block.text:
                continue
            text = _PORT_PLACEHOLDER.sub("1", block.text)
            document = yaml.safe_load(text)
            if isinstance(document, dict) and _WHOLE_FILE_KEYS & set(document):
                found.append(Example(block.doc, block.line, text))
    return found


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for example in whole_file_examples():
        (out / example.name).write_text(example.text, encoding="utf-8")
        print(out / example.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
