"""Faults during a job: the network (local Hub-protocol server with fault injection), the disk, a killed
process and a cancel at every stage. After each: a clear one-line error (or CancelledError), nothing
half-done left behind (no output folder, no partial folder, no repository), and a retry that succeeds.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merger import hub as mhub
from merger import hub_errors
from merger import writer as mwriter
from merger.errors import CancelledError, HubError, MergerError, ModelError
from merger.pipeline import Event, RunOptions, run
from merger.recipe import parse_recipe
from tests.conftest import ACME_TIES_RECIPE as RECIPE
from tests.hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_alice_write"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries keep their count and order, without the waits (RETRY_DELAYS is read at call time)."""
    monkeypatch.setattr(hub_errors, "RETRY_DELAYS", (0.0, 0.0, 0.0))


@pytest.fixture
def published(hub: HubServer, tiny: dict[str, Path]) -> HubServer:
    hub.upload_folder(tiny["base"], "acme/base")
    hub.upload_folder(tiny["chat"], "acme/chat")
    hub.stats.__init__()
    return hub


def leftovers(out: Path) -> list[str]:
    """Anything a job could have left next to its output: the folder itself or a partial of it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert isinstance(e, MergerError) and text and "\n" not in text, repr(text)
    return text


# ---------------------------------------------------------------- network

def test_dropped_connection_mid_download_resumes_and_merges_identically(published: HubServer, tmp_path: Path,
                                                                        tiny: dict[str, Path]) -> None:
    published.inject("resolve_get", "drop", times=1, repo="acme/chat", path="model.safetensors")
    result = run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu"))
    ranges = published.stats.ranges[("acme/chat", "model.safetensors")]
    size = (tiny["chat"] / "model.safetensors").stat().st_size
    assert len(ranges) >= 2 and ranges[-1][1] == size  # cut mid-body, then the rest by Range
    local = parse_recipe(RECIPE.replace("acme/base", str(tiny["base"])).replace("acme/chat", str(tiny["chat"])))
    run(local, RunOptions(tmp_path / "ref", device="cpu"))
    got, want = weights(result.out_dir), weights(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("fault", ["server_error", "rate_limit"])
def test_transient_errors_are_retried_then_succeed(published: HubServer, tmp_path: Path, fault: str) -> None:
    published.inject("info", fault, times=2, retry_after=0)
    published.inject("resolve_get", fault, times=2, retry_after=0)
    run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", skip_check=True))
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert published.stats.requests["info"] >= 4  # two refused, then one per model


@pytest.mark.parametrize("fault,words", [("server_error", "server error (HTTP 500)"),
                                         ("rate_limit", "rate-limiting your requests (HTTP 429)")])
def test_persistent_errors_give_one_clear_line_after_the_retries(published: HubServer, tmp_path: Path,
                                                                 fault: str, words: str) -> None:
    published.inject("info", fault, times=None, retry_after=0)
    with pytest.raises(HubError) as e:
        run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", skip_check=True))
    assert words in one_line(e.value)
    assert published.stats.requests["info"] == 1 + len(hub_errors.RETRY_DELAYS)  # first try + every retry
    assert leftovers(tmp_path / "out") == []


def test_long_retry_after_is_reported_not_waited(published: HubServer, tmp_path: Path) -> None:
    published.inject("info", "rate_limit", times=None, retry_after=3600)
    started = time.monotonic()
    with pytest.raises(HubError) as e:
        run(parse_recipe(RECIPE), RunOptions(tmp_path / "out", device="cpu", skip_check=True))
    assert time.monotonic() - started < 10 and "wait 3600 seconds" in one_line(e.value)


def test_upload_failing_mid_commit_leaves_no_repo_and_a_retry_succeeds(published: HubServer,
                                                                       tmp_path: Path) -> None:
    published.inject("commit", "server_error", times=None)
    options = RunOptions(tmp_path / "out", device="cpu", token=TOKEN, push="alice/merged")
    with pytest.raises(HubError) as e:
        run(parse_recipe(RECIPE), options)
    assert "deleted again" in one_line(e.value) and TOKEN not in str(e.value)
    assert "alice/merged" not in published.repos  # created for the push, removed when its commit failed
    assert published.stats.requests["lfs_upload"] >= 1  # the weights were on the wire when it failed
    published.clear_faults()
    options.overwrite = True  # the local merge finished before the push; the retry replaces it
    result = run(parse_recipe(RECIPE), options)
    files = published.repo_files("alice/merged")
    assert result.pushed and {"model.safetensors", "config.json", "README.md", "mergekit_config.yml"} <= set(files)
    assert len(published.commit_history("alice/merged")) == 2  # the initial commit + one upload commit


# ---------------------------------------------------------------- disk

class _FullDisk:
    """A file object that accepts `budget` bytes, then fails as a full disk does (ENOSPC from write)."""

    def __init__(self, f: Any, budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_disk_full_while_writing_the_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            tiny: dict[str, Path]) -> None:
    """ENOSPC from the writer's file object after 20 kB: the temp folder is removed, the error is one line."""
    opened: list[Path] = []

    def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        return _FullDisk(open(path, mode, *args, **kwargs), 20_000)

    monkeypatch.setattr(mwriter, "open", full_open, raising=False)
    recipe = parse_recipe(RECIPE.replace("acme/base", str(tiny["base"])).replace("acme/chat", str(tiny["chat"])))
    out = tmp_path / "out"
    with pytest.raises(ModelError) as e:
        run(recipe, RunOptions(out, device="cpu"))
    assert one_line(e.value).startswith("the disk is full while writing") and "partial output was removed" in str(e.value)
    assert opened and leftovers(out) == []  # the shard was being written inside the partial folder, now gone
    monkeypatch.undo()
    run(recipe, RunOptions(out, device="cpu"))
    assert (out / "model.safetensors").exists()


# ---------------------------------------------------------------- killed process

SLOW_CLI = """
import sys, time
from merger import engine
compute = engine.MergeRunner.compute
def slow(self, *args, **kwargs):
    time.sleep(0.15)  # a tiny model merges in milliseconds; this keeps it mid-merge long enough to be killed
    return compute(self, *args, **kwargs)
engine.MergeRunner.compute = slow
from merger.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_merge_leaves_only_a_partial_that_the_next_run_removes(tmp_path: Path, tiny: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPE.replace("acme/base", str(tiny["base"])).replace("acme/chat", str(tiny["chat"])))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "run", str(recipe), str(out), "--device", "cpu"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline and partial is None:
            found = [p for p in tmp_path.glob(".out.partial-*") if (p / "model.safetensors").exists()]
            partial = found[0] if found else None
            time.sleep(0.05)
        assert partial is not None, "the merge never started writing"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not out.exists()  # nothing that looks like a finished model
    assert partial.exists() and partial.name.startswith(f".out.partial-{proc.pid}-")
    assert not (partial / "config.json").exists()  # the half-written folder has no config: not loadable
    result = run(parse_recipe(recipe.read_text(), base_dir=tmp_path), RunOptions(out, device="cpu"))
    assert leftovers(out) == ["out"] and (result.out_dir / "config.json").exists()


# ---------------------------------------------------------------- cancel at every stage

STAGES = ["check", "download", "merge", "gguf", "upload"]


@pytest.mark.parametrize("stage", STAGES)
def test_cancel_at_every_stage_leaves_nothing(published: HubServer, tmp_path: Path, stage: str) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def progress(event: Event) -> None:
        seen.append(event.stage)
        if event.stage == stage:
            cancel.set()

    out = tmp_path / "out"
    options = RunOptions(out, device="cpu", token=TOKEN, push="alice/cancelled",
                         gguf=("F16",) if stage == "gguf" else ())
    with pytest.raises(CancelledError) as e:
        run(parse_recipe(RECIPE), options, progress=progress, cancel=cancel)
    one_line(e.value)
    assert stage in seen
    assert leftovers(out) == [], f"cancel during {stage} left {leftovers(out)}"
    assert "alice/cancelled" not in published.repos
