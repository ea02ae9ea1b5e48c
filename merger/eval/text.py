"""The shipped evaluation text (prose, code, chat), read as named sections.

Every GGUF verification and every merge-quality figure is measured on it, so the numbers of two merges
are comparable. It is original text written for this project (see the comment at the top of the file).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TEXT_FILE = Path(__file__).with_name("eval_text.md")
SOURCE = "merger/eval/eval_text.md (original text written for this project: prose, code, chat)"


@lru_cache(maxsize=1)
def eval_sections() -> tuple[tuple[str, str], ...]:
    """(name, text) for each `## name` section of the evaluation text, in file order."""
    sections: list[tuple[str, list[str]]] = []
    for line in TEXT_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return tuple((name, "\n".join(lines).strip("\n")) for name, lines in sections)
