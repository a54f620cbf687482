"""The one writer of docs/benchmarks.md that every benchmark shares: each owns a section between its own
markers (``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``), replaced in place on a new run and
appended, under its heading, the first time; the other sections are kept as they are."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(begin: str, end: str, body: str, heading: str | None = None, path: Path = DOCS) -> Path:
    """``body`` between ``begin`` and ``end`` in ``path``; a new section goes at the end, after ``heading``
    (a Markdown heading line) when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)
    return path
