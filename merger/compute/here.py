"""`here`: the pipeline in this process (the CLI's machine, or the machine serving the app)."""

from __future__ import annotations

import threading

from ..pipeline import EventCallback, RunOptions, run
from ..recipe import Recipe
from .base import Handle, Outcome, read_outcome


class HereHandle(Handle):
    def __init__(self, recipe: Recipe, options: RunOptions) -> None:
        self.recipe, self.options = recipe, options
        self._cancel = threading.Event()

    def run(self, progress: EventCallback) -> Outcome:
        result = run(self.recipe, self.options, progress=progress, cancel=self._cancel)
        return read_outcome(result, kept=True)

    def cancel(self) -> None:
        self._cancel.set()


class Here:
    """Runs in the calling thread; the pipeline stops at its next tensor, chunk or stage on cancel."""

    name = "here"

    def submit(self, recipe: Recipe, options: RunOptions) -> HereHandle:
        return HereHandle(recipe, options)
