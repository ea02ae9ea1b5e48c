"""The app's queue of merge runs (not Hugging Face Jobs): each runs pipeline.run in its own thread,
reports live, and can be cancelled.

A job is created when the user clicks Merge (so it can be cancelled while it still waits in the queue)
and started when the queue gives it its turn. It owns one folder (the output folder inside it), which
it removes on error or cancel, and on a Space also after success, once the result was read for display
and pushed: nothing half-made and nothing of one user's is left for the next.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..compute import Backend, Handle, Here, Outcome, read_outcome
from ..errors import CancelledError, MergerError
from ..pipeline import Event, RunOptions, RunResult
from ..recipe import Recipe

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STAGES = ("check", "download", "merge", "gguf", "verify", "evaluate", "upload")
MAX_LOG_LINES = 500
MAX_JOBS_KEPT = 64
log = logging.getLogger(__name__)

Task = Callable[[Callable[[Event], None], threading.Event], RunResult]  # (progress, cancel) -> result
EventHook = Callable[["Run", Event], None]  # called in the worker after each event (tests pause here)


@dataclass(frozen=True)
class Snapshot:
    """A job's state at one moment, for the progress bar, the log and the result panel."""

    job_id: str
    status: str
    stage: str
    fraction: float
    message: str
    bytes_done: int
    bytes_total: int
    eta_seconds: float | None
    log: tuple[str, ...]
    outcome: Outcome | None = None
    error: str | None = None
    url: str | None = None  # the run's own page when it runs elsewhere (a Hugging Face Job)


@dataclass
class Run:
    """One merge: created queued, started once, cancellable at any time (a cancel before start wins)."""

    job_id: str
    hook: EventHook | None = None
    status: str = QUEUED
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: threading.Event = field(default_factory=threading.Event)
    _event: Event = field(default_factory=lambda: Event("queued", 0.0, "waiting for its turn in the queue"))
    _stage_started: float = field(default_factory=time.monotonic)
    _log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_LOG_LINES))
    _outcome: Outcome | None = None
    _error: str | None = None
    _thread: threading.Thread | None = None
    _handle: Handle | None = None

    def start(self, recipe: Recipe | None, options: RunOptions | None, *, job_dir: Path, keep: bool,
              cache_dir: Path | None = None, task: Task | None = None, backend: Backend | None = None) -> None:
        """Run in a worker thread on `backend` (default: here). `job_dir` holds out_dir and belongs to this job:
        it is removed on error or cancel, and also after success unless `keep` (a Space keeps nothing once
        the push is done). With `cache_dir` (inside job_dir) the job downloads into that cache of its own, not
        the shared one. `task` replaces the merge pipeline (e.g. the app's quantize-only mode) with the same
        reporting, here."""
        with self._lock:
            if self.status != QUEUED:
                raise MergerError(f"job {self.job_id} was already started")
            if self.cancel_event.is_set():
                self._finish(CANCELLED, "cancelled before it started; nothing was written")
                shutil.rmtree(job_dir, ignore_errors=True)
                self._finished.set()
                return
            self.status = RUNNING
        self._thread = threading.Thread(target=self._work, args=(recipe, options, job_dir, keep, cache_dir, task,
                                                                 backend or Here()),
                                        name=f"merge-{self.job_id}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the job to stop; the pipeline stops at its next tensor, chunk or stage and cleans up."""
        self.cancel_event.set()
        with self._lock:
            handle = self._handle
            if self.status == QUEUED:
                self._add_log("cancel requested; the job will not start")
            elif self.status == RUNNING:
                self._add_log("cancel requested; stopping and removing what was written")
        if handle is not None:
            try:
                handle.cancel()
            except MergerError as e:  # e.g. the Hub did not take a job's cancel: say so, keep following
                with self._lock:
                    self._add_log(f"cancel failed: {e}")

    def wait(self, timeout: float | None = None) -> bool:
        """True when the job has finished (in any way) within `timeout` seconds."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def snapshot(self) -> Snapshot:
        """The state now; its status is final only once wait() returned True (cleanup done)."""
        with self._lock:
            e = self._event
            return Snapshot(self.job_id, self.status, e.stage, e.fraction, e.message, e.bytes_done, e.bytes_total,
                            self._eta(), tuple(self._log), self._outcome, self._error,
                            self._handle.url if self._handle is not None else None)

    # ------------------------------------------------------------ worker side

    def _work(self, recipe: Recipe | None, options: RunOptions | None, job_dir: Path, keep: bool,
              cache_dir: Path | None, task: Task | None, backend: Backend) -> None:
        from ..hub import job_cache

        kept = False
        try:
            with job_cache(cache_dir) if cache_dir is not None else contextlib.nullcontext():
                if task is not None:
                    outcome = read_outcome(task(self._on_event, self.cancel_event), kept=keep)
                else:
                    handle = backend.submit(recipe, options)
                    with self._lock:
                        self._handle = handle
                    if self.cancel_event.is_set():  # a cancel between start() and here
                        handle.cancel()
                    outcome = handle.run(self._on_event)
            if not keep:
                outcome = dataclasses.replace(outcome, out_dir=None)
            kept = keep
            with self._lock:
                self._outcome = outcome
                self._finish(DONE, f"done in {outcome.seconds:.1f} s")
        except BaseException as e:  # the worker must always finish the job and clean up
            with self._lock:
                if isinstance(e, CancelledError) or self.cancel_event.is_set():
                    self._finish(CANCELLED, "cancelled; everything it wrote was removed")
                elif isinstance(e, MergerError):
                    self._error = str(e)
                    self._finish(FAILED, f"failed: {e}")
                else:
                    log.exception("merge job %s crashed", self.job_id)
                    self._error = f"internal error ({type(e).__name__}); please report it with your recipe"
                    self._finish(FAILED, f"failed: {self._error}")
        finally:
            if not kept:
                shutil.rmtree(job_dir, ignore_errors=True)
            self._finished.set()  # only now: waiters see the job finished *and* cleaned up

    def _on_event(self, event: Event) -> None:
        with self._lock:
            previous = self._event
            if event.stage != previous.stage:
                self._stage_started = time.monotonic()
            self._event = event
            if (event.stage, event.message) != (previous.stage, previous.message):
                self._add_log(f"{event.stage}: {event.message}")
        if self.hook is not None:
            self.hook(self, event)

    def _finish(self, status: str, line: str) -> None:
        self.status = status
        self._event = Event(status, 1.0 if status == DONE else self._event.fraction, line,
                            self._event.bytes_done, self._event.bytes_total)
        self._add_log(line)

    def _add_log(self, line: str) -> None:
        self._log.append(f"{time.strftime('%H:%M:%S')}  {line}")

    def _eta(self) -> float | None:
        """Seconds left in the current stage, extrapolated from its progress so far (bytes when known)."""
        e = self._event
        if self.status != RUNNING:
            return None
        done = e.bytes_done / e.bytes_total if e.bytes_total else e.fraction
        elapsed = time.monotonic() - self._stage_started
        if done <= 0.01 or elapsed < 0.5:
            return None
        return elapsed * (1 - done) / done


class RunQueue:
    """The app's jobs by id, so a Cancel click (another request) reaches the job its session started."""

    def __init__(self, hook: EventHook | None = None) -> None:
        self.hook = hook
        self._jobs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def new_job(self) -> Run:
        with self._lock:
            done = [k for k, j in self._jobs.items() if j.finished]
            for key in done[: max(0, len(self._jobs) - MAX_JOBS_KEPT)]:
                del self._jobs[key]
            job = Run(uuid.uuid4().hex[:12], hook=self.hook)
            self._jobs[job.job_id] = job
            return job

    def get(self, job_id: str | None) -> Run | None:
        with self._lock:
            return self._jobs.get(job_id or "")

    def cancel(self, job_id: str | None) -> bool:
        """Cancel the job if it exists and is not finished; False otherwise."""
        job = self.get(job_id)
        if job is None or job.finished:
            return False
        job.cancel()
        return True
