"""The README's table of supported architectures, generated from the tables the code runs on.

`python -m quantize.support` rewrites the table between the README's markers; a test checks that the
README holds exactly what `markdown_table()` says, so the list cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from merger.families import FAMILIES
from quantize.convert import LLAMA_CPP_ARCHITECTURES, supported_architectures

__all__ = ["README", "markdown_table", "update_readme"]

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def _gguf(architecture: str) -> str:
    if architecture in supported_architectures():
        return "streamed during the merge"
    if architecture in LLAMA_CPP_ARCHITECTURES:
        return "llama.cpp's converter"
    return "no"


def markdown_table() -> str:
    """One row per family of merger/families.py: its `architectures` value, merge and GGUF support."""
    rows = ["| family | `architectures` | merge | GGUF export |", "|---|---|---|---|"]
    for family in FAMILIES:
        arch = family.architectures[0]
        rows.append(f"| {family.name} | {arch} | yes | {_gguf(arch)} |")
    return "\n".join(rows)


def update_readme(path: Path = README) -> bool:
    """Rewrite the table between the markers; returns whether the file changed."""
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{markdown_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date", file=sys.stderr)
