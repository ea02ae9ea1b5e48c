"""ZeroGPU without ZeroGPU: a fake `spaces` package that, like the real one, takes the window's duration
from a callable of the function's arguments and sends arguments and yielded items through pickle (the real
one runs the function in a forked process); it refuses calls from any thread but the one standing for
the Gradio event. The app's flow is followed the way app.py does it (demo.follow with the backend's serve)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.app import demo
from merger.app.runs import CANCELLED, DONE, FAILED, RunQueue
from merger.compute import zerogpu
from merger.compute.resources import needs_from_report
from merger.pipeline import Event, RunOptions, check
from merger.recipe import parse_recipe
from tests.hubserver import HubServer

RECIPE = """models:
  - model: alice/base
    parameters: {weight: 0.5}
  - model: alice/chat
    parameters: {weight: 0.5}
merge_method: linear
dtype: float32
"""
FAKE_SPACES = '''
import pickle, threading, time
CALLS = []
EVENT_THREAD = None

def GPU(task=None, *, duration=None, size=None):
    def decorate(fn):
        def wrapper(*args):
            if threading.current_thread() is not EVENT_THREAD:
                raise RuntimeError("ZeroGPU: not called from the Gradio event")
            seconds = duration(*args) if callable(duration) else duration
            args = pickle.loads(pickle.dumps(args))
            call = {"seconds": seconds, "size": size, "start": time.monotonic(), "end": None}
            CALLS.append(call)
            try:
                for item in fn(*args):
                    yield pickle.loads(pickle.dumps(item))
            finally:
                call["end"] = time.monotonic()
        return wrapper
    return decorate if task is None else decorate(task)
'''


@pytest.fixture
def fake_spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "spaces.py").write_text(FAKE_SPACES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    import importlib

    import spaces

    spaces = importlib.reload(spaces)
    spaces.EVENT_THREAD = threading.current_thread()
    monkeypatch.setattr(zerogpu, "_WINDOW", [])
    zerogpu.prepare()  # as app.py does at start-up
    assert zerogpu._WINDOW
    yield spaces
    monkeypatch.delitem(__import__("sys").modules, "spaces")


@pytest.fixture
def parents(hub: HubServer, tiny: dict[str, Path]) -> None:
    for name in ("base", "chat"):
        hub.upload_folder(tiny[name], f"alice/{name}")


def _run(backend: zerogpu.ZeroGPU, out: Path, hook=None):  # noqa: ANN001, ANN202
    """Start the run in the queue's worker and follow it here, as the app's Gradio event does."""
    run = RunQueue(hook=hook).new_job()
    run.start(parse_recipe(RECIPE, allow_local=False), RunOptions(out_dir=out, allow_local=False),
              job_dir=out.parent, keep=True, backend=backend)
    snaps = list(demo.follow(run, interval=0.05, serve=backend.serve))
    return run, snaps


def test_merge_runs_in_a_window_opened_from_the_event_thread(fake_spaces, parents, tiny: dict[str, Path],
                                                            tmp_path: Path) -> None:  # noqa: ANN001
    times: dict[str, list[float]] = {}

    def hook(run, event: Event) -> None:  # noqa: ANN001
        times.setdefault(event.stage, []).append(time.monotonic())

    assert zerogpu.available()
    backend = zerogpu.ZeroGPU(quota_seconds=300)
    run, snaps = _run(backend, tmp_path / "job" / "out", hook)
    assert run.snapshot().status == DONE, run.snapshot().error
    (call,) = fake_spaces.CALLS
    needs = needs_from_report(check(parse_recipe(RECIPE, allow_local=False)))
    assert call["seconds"] == zerogpu.window_seconds(needs) and call["size"] is None  # spaces' default: large
    # downloads before the window, the merge inside it, the push (none here) after it
    assert max(times["download"]) < call["start"] <= min(times["merge"][1:])  # [0]: "waiting for a window"
    assert max(times["merge"]) <= call["end"]
    assert any(s.stage == "merge" and 0 < s.fraction < 1 for s in snaps)  # progress crossed the window
    got = load_file(tmp_path / "job" / "out" / "model.safetensors")
    a, b = (load_file(tiny[n] / "model.safetensors") for n in ("base", "chat"))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, (a[name].double() * 0.5 + b[name].double() * 0.5).float(), rtol=0,
                                   atol=1e-6)


def test_a_merge_bigger_than_the_quota_is_offered_to_jobs(fake_spaces, parents, tmp_path: Path) -> None:  # noqa: ANN001
    run, _ = _run(zerogpu.ZeroGPU(quota_seconds=20), tmp_path / "job" / "out")
    snap = run.snapshot()
    needs = needs_from_report(check(parse_recipe(RECIPE, allow_local=False)))
    seconds = zerogpu.window_seconds(needs)
    assert snap.status == FAILED and not fake_spaces.CALLS
    assert 20 < seconds < 120
    assert snap.error == (f"this merge needs about {seconds} s of GPU time, more than your ZeroGPU "
                          "quota (20 s a day); run it on Hugging Face Jobs instead")


def test_cancel_inside_the_window_removes_the_output(fake_spaces, parents, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import merger.writer

    write = merger.writer.ShardedWriter.write
    monkeypatch.setattr(merger.writer.ShardedWriter, "write",
                        lambda self, name, tensor: (time.sleep(0.05), write(self, name, tensor))[1])

    def hook(run, event: Event) -> None:  # noqa: ANN001
        if event.stage == "merge" and event.fraction > 0:
            run.cancel()

    run, _ = _run(zerogpu.ZeroGPU(quota_seconds=300), tmp_path / "job" / "out", hook)
    assert run.snapshot().status == CANCELLED
    assert fake_spaces.CALLS and fake_spaces.CALLS[0]["end"] is not None
    assert not (tmp_path / "job").exists()


def test_window_duration_follows_the_planned_bytes() -> None:
    from merger.compute.resources import GB, Needs

    small = Needs(ram_bytes=4 * GB, disk_bytes=2 * GB, gpu_bytes=1 * GB, read_bytes=3 * GB, output_bytes=1 * GB,
                  gguf_bytes=0, parents_on_disk=3 * GB)
    big = Needs(ram_bytes=4 * GB, disk_bytes=40 * GB, gpu_bytes=2 * GB, read_bytes=45 * GB, output_bytes=15 * GB,
                gguf_bytes=0, parents_on_disk=45 * GB)
    # 30 s to start, then 1.5 x (reads at 200 MB/s + writes at 300 MB/s), rounded up:
    # small 30 + 1.5 * (15 + 3.33) = 57.5; big 30 + 1.5 * (225 + 50) = 442.5
    assert zerogpu.window_seconds(small) == 58
    assert zerogpu.window_seconds(big) == 443
    assert zerogpu.refusal(big, zerogpu.window_seconds(big), quota=zerogpu.DAILY_QUOTA["free"]).startswith(
        "this merge needs about 7 min of GPU time, more than your ZeroGPU quota (5 min a day)")
    assert zerogpu.refusal(big, zerogpu.window_seconds(big), quota=zerogpu.DAILY_QUOTA["pro"]) is None
    huge = Needs(**{**vars(big), "gpu_bytes": 60 * GB})
    assert "60.0 GB of GPU memory, more than a ZeroGPU window has (48 GB)" in zerogpu.refusal(huge, 10, quota=600)


def test_check_in_the_app_says_whether_the_window_holds_the_merge(fake_spaces, parents,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from merger.app import where

    recipe = parse_recipe(RECIPE, allow_local=False)
    report = check(recipe)
    seconds = zerogpu.window_seconds(needs_from_report(report))
    assert where.choices()[0] == ("Run here (ZeroGPU)", where.HERE)
    assert where.zerogpu_quota("hf_alice_write") == 300  # a free account (the Hub says isPro: false)
    assert isinstance(where.backend(where.HERE, token=None), zerogpu.ZeroGPU)
    assert where.plan_markdown(where.HERE, recipe, report, token=None, quants=()) == \
        f"ZeroGPU: the merge gets a GPU window of about {seconds} s."
    monkeypatch.setenv("MERGER_ZEROGPU_QUOTA", "20")
    assert where.plan_markdown(where.HERE, recipe, report, token=None, quants=()) == (
        f"✗ this merge needs about {seconds} s of GPU time, more than your ZeroGPU quota (20 s a day); "
        "run it on Hugging Face Jobs instead")
