"""What the benchmarks share: running the CLI, and reporting a run.

docs/benchmarks.md has one writer: each benchmark owns a section between its own markers
(``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``), replaced in place on a new run and appended, under
its heading, the first time; the other sections are kept as they are."""

from __future__ import annotations

import json
import subprocess
import sys
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


def cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``controlplane ARGS`` in this interpreter, its output captured."""
    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def report(table: str, doc: dict, json_path: Path | None, section: tuple[str, str, str] | None) -> None:
    """A run's end: its table printed, its JSON written (``json_path``), and the table in docs/benchmarks.md
    (``section``: begin marker, end marker, heading; None: not)."""
    print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1))
    if section is not None:
        write_section(*section[:2], table, section[2])
