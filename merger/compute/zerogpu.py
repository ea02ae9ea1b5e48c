"""`zerogpu`: the app on a ZeroGPU Space (Gradio SDK, `spaces` installed, SPACES_ZERO_GPU set).

A ZeroGPU Space holds a GPU only inside a function decorated with `@spaces.GPU(duration=...)`, and that
function must be called from the Gradio event handling the user's request (spaces reads the request from
the event's context to schedule the GPU and charge the user's daily quota): a merge started from the app's
background worker thread would get no GPU. So the run is split: the check and the downloads happen in the
worker, outside the GPU window; the merge step (merge, GGUF, card) is handed to the event's thread, which
calls the decorated function with a duration computed from the planned bytes; the push happens in the
worker again. spaces runs the decorated function in a forked process: the step's arguments and what it
yields (Events, then the result) are pickled, and progress comes back as the generator's items.

ZeroGPU facts (hub-docs spaces-zerogpu.md, spaces 0.51.3, checked 2026-12): Gradio SDK only; Python
3.12.12 or 3.10.13; torch 2.8.0, 2.9.1, 2.10.0 or 2.11.0; `size="large"` is half an RTX Pro 6000
Blackwell (48 GB), `xlarge` the whole GPU (96 GB) at twice the quota; daily quotas: 2 min unauthenticated,
5 min free accounts, 40 min PRO and Team, 60 min Enterprise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..errors import CancelledError, ModelError
from ..pipeline import Event, EventCallback, RunOptions, RunResult, run
from ..recipe import Recipe
from .base import Handle, Outcome, read_outcome
from .resources import GB, GGUF_BPS_PER_CORE, Needs, forward_seconds, merge_seconds, needs_from_report

WINDOW_CORES = 8  # CPU cores a ZeroGPU window's process may use for the GGUF step (a planning figure)
WINDOW_MARGIN = 1.5  # the window is the estimate times this, plus START
WINDOW_START = 30.0  # seconds to fork the worker and attach the GPU
DAILY_QUOTA = {"free": 5 * 60, "pro": 40 * 60}  # seconds; PRO and Team members, from the ZeroGPU docs
WINDOW_GPU_BYTES = 48 * GB  # size "large" (the default): half an RTX Pro 6000 Blackwell
_WINDOW: list[Callable[..., Iterator[Any]]] = []  # merge_window under @spaces.GPU, made once at start-up


def available(environ: Mapping[str, str] | None = None) -> bool:
    """True on a ZeroGPU Space: SPACES_ZERO_GPU set (by the Space) and the `spaces` package importable."""
    env = os.environ if environ is None else environ
    flag = str(env.get("SPACES_ZERO_GPU", "")).lower() in ("1", "t", "true")
    return flag and importlib.util.find_spec("spaces") is not None


def window_seconds(needs: Needs) -> int:
    """The GPU window for a merge: reading, merging, writing, the GGUF step, the evaluation's and the GGUF
    verification's forward passes, with a margin."""
    gguf = needs.gguf_bytes / (GGUF_BPS_PER_CORE * WINDOW_CORES) if needs.gguf_bytes else 0.0
    work = merge_seconds(needs, cores=WINDOW_CORES, gpu=True) + gguf + forward_seconds(needs, cores=WINDOW_CORES,
                                                                                       gpu=True)
    return int(math.ceil(WINDOW_START + WINDOW_MARGIN * work))


def refusal(needs: Needs, seconds: int, *, quota: int) -> str | None:
    """Why this merge cannot run in a ZeroGPU window (and that Jobs can), or None when it fits."""
    if needs.gpu_bytes > WINDOW_GPU_BYTES:
        return (f"this merge needs {needs.gpu_bytes / GB:.1f} GB of GPU memory, more than a ZeroGPU window has "
                f"({WINDOW_GPU_BYTES / GB:.0f} GB); run it on Hugging Face Jobs instead")
    if seconds > quota:
        return (f"this merge needs about {_span(seconds)} of GPU time, more than your ZeroGPU quota "
                f"({_span(quota)} a day); run it on Hugging Face Jobs instead")
    return None


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass
class _Pending:
    """A merge step waiting for the event's thread, and what became of it."""

    step: Callable[..., RunResult]
    seconds: int
    report: EventCallback
    cancel: threading.Event | None
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False
    result: RunResult | None = None
    error: BaseException | None = None


def _window_duration(step: Any, seconds: int) -> int:
    return seconds


def prepare() -> None:
    """Decorate the GPU window now: ZeroGPU looks for @spaces.GPU functions when the Space starts."""
    if available():
        window()


def window() -> Callable[..., Iterator[Any]]:
    """merge_window under @spaces.GPU, its duration taken from its `seconds` argument."""
    if not _WINDOW:
        import spaces

        _WINDOW.append(spaces.GPU(duration=_window_duration)(merge_window))
    return _WINDOW[0]


def merge_window(step: Callable[..., RunResult], seconds: int) -> Iterator[Event | RunResult]:
    """The body of the GPU window: the merge step in a thread, its Events yielded as they come, then the
    result (a generator, so progress crosses the process boundary spaces puts around it)."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = step(events.put, stop)
        except BaseException as e:  # handed to the consumer below
            box["error"] = e
        finally:
            events.put(None)

    worker = threading.Thread(target=work, name="zerogpu-merge", daemon=True)
    worker.start()
    try:
        while (item := events.get()) is not None:
            yield item
    finally:  # also when the consumer closes us (a cancel): stop the step and let it clean up
        stop.set()
        worker.join()
    if "error" in box:
        raise box["error"]
    yield box["result"]


class ZeroGPU:
    """Runs check and downloads in the caller's (worker) thread and the merge in a ZeroGPU window opened
    from the Gradio event's thread, which must call `serve()` while it follows the run."""

    name = "zerogpu"

    def __init__(self, *, quota_seconds: int = DAILY_QUOTA["free"]) -> None:
        self.quota_seconds = quota_seconds
        self._pending: queue.Queue[_Pending] = queue.Queue()

    def submit(self, recipe: Recipe, options: RunOptions) -> ZeroGPUHandle:
        return ZeroGPUHandle(self, recipe, options)

    def serve(self) -> Iterator[None]:
        """In the Gradio event's thread: run a merge step handed over by the worker inside @spaces.GPU, here,
        yielding after each of its Events (so the event can refresh the page); nothing when none waits."""
        try:
            pending = self._pending.get_nowait()
        except queue.Empty:
            return
        pending.taken = True
        gpu = window()(pending.step, pending.seconds)
        try:
            for item in gpu:
                if isinstance(item, Event):
                    pending.report(item)
                    yield
                else:
                    pending.result = item
                if pending.cancel is not None and pending.cancel.is_set():
                    gpu.close()
                    raise CancelledError("the job was cancelled; nothing was written")
            if pending.result is None:
                raise ModelError("the ZeroGPU window ended without a result; retry, or run on Hugging Face Jobs")
        except BaseException as e:
            pending.error = e
        finally:
            pending.done.set()

    def hand_over(self, step: Callable[..., RunResult], report: EventCallback, cancel: threading.Event | None,
                  seconds: int) -> RunResult:
        """In the worker: queue the step for the event's thread and wait for its result."""
        pending = _Pending(step, seconds, report, cancel)
        self._pending.put(pending)
        report(Event("merge", 0.0, f"waiting for a ZeroGPU window of {seconds} s"))
        while not pending.done.wait(0.2):
            if cancel is not None and cancel.is_set() and not pending.taken:
                raise CancelledError("the job was cancelled before its GPU window; nothing was written")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result


class ZeroGPUHandle(Handle):
    def __init__(self, backend: ZeroGPU, recipe: Recipe, options: RunOptions) -> None:
        self.backend, self.recipe, self.options = backend, recipe, options
        self._cancel = threading.Event()

    def run(self, progress: EventCallback) -> Outcome:
        from ..pipeline import check

        progress(Event("check", 0.0, "checking the recipe and the models (no weights are downloaded)"))
        report = check(self.recipe, token=self.options.token, gguf=self.options.gguf, allow_bin=self.options.allow_bin,
                       max_memory=self.options.max_memory)
        errors = [p for p in report.problems if p.severity == "error"]
        if errors:
            fix = f"; {errors[0].fix}" if errors[0].fix else ""
            raise ModelError(f"pre-flight check failed: {errors[0].message}{fix}")
        needs = needs_from_report(report, evaluate=self.options.evaluate)
        seconds = window_seconds(needs)
        why = refusal(needs, seconds, quota=self.backend.quota_seconds)
        if why:
            raise ModelError(why)
        progress(Event("check", 1.0, f"check passed; the merge gets a ZeroGPU window of {seconds} s"))
        options = dataclasses.replace(self.options, skip_check=True)
        result = run(self.recipe, options, progress=progress, cancel=self._cancel,
                     merge_runner=lambda step, report_, cancel: self.backend.hand_over(step, report_, cancel, seconds))
        return read_outcome(result, kept=True)

    def cancel(self) -> None:
        self._cancel.set()
