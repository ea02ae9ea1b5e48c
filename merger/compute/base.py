"""The one interface every place a merge can run behind: submit a request, get a handle.

A handle's `run(progress)` blocks in the caller's thread, reports the pipeline's Events as the run goes
and returns an Outcome (or raises: MergerError for a failure a person can act on, CancelledError after a
cancel); `cancel()` may be called from any other thread at any time, before or during `run`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..pipeline import EventCallback, RunOptions, RunResult
from ..recipe import Recipe


@dataclass(frozen=True)
class Outcome:
    """What a finished run produced, read before its folder may be removed."""

    files: tuple[tuple[str, int], ...]  # (path inside the output folder, bytes)
    card: str
    pushed: tuple[str, ...]
    sanity: dict[str, str]
    warnings: tuple[str, ...]
    out_dir: Path | None  # None when nothing is kept on this machine (a Space after the push, a Job)
    seconds: float
    quality: tuple[str, ...] = ()  # the merge-vs-parents table (markdown lines)
    verdict: str | None = None  # "this merge looks broken: ..." when it does
    url: str | None = None  # where the run can be watched, for a run elsewhere (a Hugging Face Job)


def read_outcome(result: RunResult, *, kept: bool) -> Outcome:
    """The file list with sizes and the rendered card of a finished local run."""
    folder = result.out_dir
    files = tuple((p.relative_to(folder).as_posix(), p.stat().st_size)
                  for p in sorted(folder.rglob("*")) if p.is_file())
    readme = folder / "README.md"
    return Outcome(files, readme.read_text(encoding="utf-8") if readme.is_file() else "",
                   tuple(result.pushed), dict(result.sanity or {}), tuple(result.warnings),
                   folder if kept else None, result.seconds,
                   tuple(result.quality.markdown()) if result.quality else (),
                   result.quality.verdict if result.quality else None)


class Handle(abc.ABC):
    """One submitted run."""

    url: str | None = None  # set once the run has a page of its own (a Job's URL)

    @abc.abstractmethod
    def run(self, progress: EventCallback) -> Outcome:
        """Run (or follow) to the end in the caller's thread, reporting progress; the outcome or an error."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the run as soon as possible; it then removes what it wrote and `run` raises CancelledError."""


class Backend(Protocol):
    """A place where merges run: `here`, `jobs` (Hugging Face Jobs), `zerogpu`."""

    name: str

    def submit(self, recipe: Recipe, options: RunOptions) -> Handle:
        """A handle for this run; nothing starts before `handle.run`."""
