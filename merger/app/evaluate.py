"""The app's "Evaluate" action: lm-evaluation-harness on a published merge as a Hugging Face Job on the
user's account (merger.compute.evaljob, the code path of `python -m merger eval --job`), followed live
and cancellable from another request, like a merge; the job commits the results to the card itself.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from typing import Any

from ..compute.evaljob import EvalJobs, EvalRequest
from ..errors import CancelledError, MergerError
from ..pipeline import Event
from .runs import CANCELLED, DONE, FAILED, MAX_LOG_LINES, QUEUED, RUNNING, Snapshot

MAX_KEPT = 64
log = logging.getLogger(__name__)


class Evaluation:
    """One evaluation job: started once in a worker thread; `cancel()` from any thread stops the Job."""

    def __init__(self, eval_id: str, request: EvalRequest, backend: EvalJobs) -> None:
        self.id = eval_id
        self.handle = backend.submit(request)
        self.status = QUEUED
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._event = Event("check", 0.0, "starting")
        self._log: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self._lock = threading.Lock()
        self._finished = threading.Event()

    def start(self) -> None:
        self.status = RUNNING
        threading.Thread(target=self._work, name=f"eval-{self.id}", daemon=True).start()

    def cancel(self) -> None:
        self._add("cancel requested; stopping the Hugging Face Job before it commits anything")
        self.handle.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def snapshot(self) -> Snapshot:
        with self._lock:
            e = self._event
            return Snapshot(self.id, self.status, e.stage, e.fraction, e.message, 0, 0, None, tuple(self._log),
                            None, self.error)

    def _work(self) -> None:
        try:
            result = self.handle.run(self._on_event)
            with self._lock:
                self.result = result
                self._finish(DONE, "done: the results were committed to the card")
        except BaseException as e:  # the worker always finishes the evaluation
            with self._lock:
                if isinstance(e, CancelledError):
                    self._finish(CANCELLED, f"cancelled: {e}")
                elif isinstance(e, MergerError):
                    self.error = str(e)
                    self._finish(FAILED, f"failed: {e}")
                else:
                    log.exception("evaluation %s crashed", self.id)
                    self.error = f"internal error ({type(e).__name__}); please report it"
                    self._finish(FAILED, f"failed: {self.error}")
        finally:
            self._finished.set()

    def _on_event(self, event: Event) -> None:
        with self._lock:
            if (event.stage, event.message) != (self._event.stage, self._event.message):
                self._log.append(f"{time.strftime('%H:%M:%S')}  {event.stage}: {event.message}")
            self._event = event

    def _add(self, line: str) -> None:
        with self._lock:
            self._log.append(f"{time.strftime('%H:%M:%S')}  {line}")

    def _finish(self, status: str, line: str) -> None:
        self.status = status
        self._event = Event(status, 1.0 if status == DONE else self._event.fraction, line)
        self._log.append(f"{time.strftime('%H:%M:%S')}  {line}")


class Evaluations:
    """The app's evaluations by id, so a Cancel click (another request) reaches the one its session started.
    `include_path`: a folder of extra lm-eval task definitions inside the job's image ($MERGER_EVAL_TASKS)."""

    def __init__(self, *, image: str | None = None, include_path: str | None = None) -> None:
        self.image = image
        self.include_path = include_path if include_path is not None else os.environ.get("MERGER_EVAL_TASKS")
        self._runs: dict[str, Evaluation | None] = {}  # None: reserved at the click, not started yet
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self) -> str:
        """An id at click time, so Cancel works before the job exists."""
        eval_id = uuid.uuid4().hex[:12]
        with self._lock:
            done = [k for k, r in self._runs.items() if r is not None and r.finished]
            for key in done[: max(0, len(self._runs) - MAX_KEPT)]:
                del self._runs[key]
            self._runs[eval_id] = None
        return eval_id

    def start(self, eval_id: str, request: EvalRequest, *, flavor: str | None = None) -> Evaluation:
        """Submit the job (unless cancelled already, then CancelledError) and follow it in a worker thread."""
        evaluation = Evaluation(eval_id, request, EvalJobs(image=self.image, flavor=flavor))
        with self._lock:
            if eval_id in self._cancelled:
                raise CancelledError("cancelled before it started; nothing was created")
            self._runs[eval_id] = evaluation
        evaluation.start()
        return evaluation

    def get(self, eval_id: str | None) -> Evaluation | None:
        with self._lock:
            return self._runs.get(eval_id or "")

    def cancel(self, eval_id: str | None) -> bool:
        """Cancel a reserved or running evaluation; False when there is none or it has finished."""
        with self._lock:
            if eval_id not in self._runs:
                return False
            evaluation = self._runs[eval_id]
            if evaluation is None:
                self._cancelled.add(eval_id)
                return True
        if evaluation.finished:
            return False
        evaluation.cancel()
        return True


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in (text or "").split(",") if t.strip())
    if not tasks:
        raise MergerError("name at least one lm-eval task, e.g. arc_challenge,hellaswag")
    return tasks


def request_from_form(repo: str, tasks: str, parents: bool, limit: float | None, *, token: str | None,
                      include_path: str | None) -> EvalRequest:
    """The Evaluate form as a request; a mistake is one line."""
    from ..hub import validate_repo_id

    repo = (repo or "").strip()
    validate_repo_id(repo)
    if limit is not None and limit < 0:
        raise MergerError("the example limit must be a positive number (or 0 for all)")
    return EvalRequest(repo, parse_tasks(tasks), parents=bool(parents), limit=int(limit) if limit else None,
                       include_path=include_path, token=token)


def render_scores(evaluation: Evaluation) -> str:
    """The result panel: the job's scores, merge first, as the card's table shows them."""
    snap = evaluation.snapshot()
    if snap.status == CANCELLED:
        return "Cancelled: the repository is unchanged."
    if snap.status == FAILED:
        return f"✗ {snap.error}"
    result = evaluation.result
    if snap.status != DONE or result is None:
        return ""
    repo = evaluation.handle.request.repo_id
    rows = [(repo, result.get("scores", {})), *result.get("parents", {}).items()]
    tasks = list(result.get("scores", {}))
    lines = [f"### ✓ Benchmarks of {repo}, committed to its card", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {name} | " + " | ".join(f"{s[t]:.4f}" if t in s else "" for t in tasks) + " |" for name, s in rows]
    if evaluation.handle.url:
        lines += ["", f"Job: [{evaluation.handle.url}]({evaluation.handle.url})"]
    return "\n".join(lines)
