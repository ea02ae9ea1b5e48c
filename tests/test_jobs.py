"""Hugging Face Jobs end to end against the local Hub (tests/hubjobs.py runs each job as a subprocess):
the CLI and the app's run queue create a job that mounts the parents pinned to the checked commits, gets
the token only as a secret, merges, pushes and reports progress through its log; cancel mid-merge and
mid-upload, a failing job, a token without the `jobs` permission; the token in no log, argument or file."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.__main__ import main
from merger.app.runs import CANCELLED, DONE, RunQueue
from merger.compute.jobs import Jobs
from merger.compute.resources import needs_from_report, run_seconds, timeout_seconds
from merger.pipeline import Event, RunOptions, check
from merger.recipe import parse_recipe
from tests.hubserver import HubServer

TOKEN = "hf_alice_write"
IMAGE = "hf.co/spaces/alice/llm-merger"
RECIPE = """models:
  - model: alice/base
    parameters: {weight: 0.5}
  - model: alice/chat
    parameters: {weight: 0.5}
merge_method: linear
dtype: float32
"""
# Slows a job down so a cancel lands where the test wants it (imported by the job's Python at start-up).
SLOW_SITECUSTOMIZE = """
import time
import merger.writer, merger.publish
_write = merger.writer.ShardedWriter.write
def write(self, name, tensor):
    time.sleep(0.1)
    return _write(self, name, tensor)
merger.writer.ShardedWriter.write = write
_preupload = merger.publish.HfApi.preupload_lfs_files
def preupload(self, *args, **kwargs):
    time.sleep(1.0)
    return _preupload(self, *args, **kwargs)
merger.publish.HfApi.preupload_lfs_files = preupload
"""


@pytest.fixture
def parents(hub: HubServer, tiny: dict[str, Path]) -> dict[str, str]:
    """The tiny pair as alice/base and alice/chat; returns repo -> head commit sha."""
    for name in ("base", "chat"):
        hub.upload_folder(tiny[name], f"alice/{name}")
    return {f"alice/{n}": hub.repos[f"alice/{n}"].branches["main"] for n in ("base", "chat")}


def _recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(RECIPE, encoding="utf-8")
    return path


def _slow_jobs(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SLOW_SITECUSTOMIZE, encoding="utf-8")
    hub.jobs.extra_pythonpath.append(str(folder))


def _all_files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def test_cli_job_merges_pushes_and_never_exposes_the_token(hub: HubServer, parents: dict[str, str],
                                                          tiny: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    hub.jobs.root = tmp_path / "jobs"
    rc = main(["run", str(_recipe_file(tmp_path)), "--job", "--job-image", IMAGE, "--push", "alice/merged",
               "--token", TOKEN])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (job,) = hub.jobs.jobs.values()
    assert job.stage == "COMPLETED" and job.returncode == 0

    # the spec: this project's image (the Space's), parents pinned read-only, the token only as a secret
    spec = job.spec
    assert spec["spaceId"] == "alice/llm-merger"
    assert [(v["type"], v["source"], v["revision"], v["readOnly"]) for v in spec["volumes"]] == [
        ("model", repo, sha, True) for repo, sha in parents.items()]
    assert spec["secrets"] == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps({k: v for k, v in spec.items() if k != "secrets"})
    report = check(parse_recipe(RECIPE, allow_local=False), token=TOKEN)
    estimate = run_seconds(needs_from_report(report), cores=2, gpu=False)
    assert spec["flavor"] == "cpu-basic"  # the cheapest flavor, and it fits a tiny merge
    assert spec["timeoutSeconds"] == timeout_seconds(estimate)

    # the job's log carried the progress lines the CLI showed as its own progress bar
    log = job.log_text()
    assert "merger-event" in log and "merger-result" in log
    assert "merge [" in err and "upload [" in err and "Hugging Face Jobs flavor: cpu-basic" in err
    assert f"pushed: {hub.url}/alice/merged" in out

    # the pushed weights: the average of the parents, computed here in float64
    merged = hub.repo_files("alice/merged")
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml"} <= set(merged)
    (tmp_path / "pushed.safetensors").write_bytes(hub.file_bytes("alice/merged", "model.safetensors"))
    got = load_file(tmp_path / "pushed.safetensors")
    a, b = (load_file(tiny[n] / "model.safetensors") for n in ("base", "chat"))
    assert set(got) == set(a)
    for name, tensor in got.items():
        want = (a[name].double() * 0.5 + b[name].double() * 0.5).float()
        torch.testing.assert_close(tensor, want, rtol=0, atol=1e-6)
    card = hub.file_bytes("alice/merged", "README.md").decode()
    assert all(sha in card for sha in parents.values())  # lineage: the commits that were mounted
    assert 'pip install "llm-merger @ git+https://huggingface.co/spaces/alice/llm-merger"' in card
    # the job ran the whole pipeline, evaluation included: the merge and both (mounted) parents scored
    assert "| model | perplexity | sample |" in card
    assert all(f"| {name} |" in card for name in ("**this merge**", "alice/base", "alice/chat"))

    # the token is in no log, argument, output or file the job left
    assert TOKEN not in log + out + err + " ".join(spec["command"])
    assert TOKEN not in _all_files_text(hub.jobs.root)


def test_app_run_queue_runs_a_job_and_shows_its_url(hub: HubServer, parents: dict[str, str],
                                                    tmp_path: Path) -> None:
    stages: list[str] = []
    queue = RunQueue(hook=lambda run, event: stages.append(event.stage))
    run = queue.new_job()
    options = RunOptions(out_dir=tmp_path / "job" / "out", token=TOKEN, push="alice/from-app", allow_local=False)
    run.start(parse_recipe(RECIPE, allow_local=False), options, job_dir=tmp_path / "job", keep=False,
              backend=Jobs(image=IMAGE))
    assert run.wait(180)
    snap = run.snapshot()
    assert snap.status == DONE, snap.error
    (job,) = hub.jobs.jobs.values()
    assert snap.url == f"{hub.url}/jobs/alice/{job.id}"
    assert {"check", "job", "merge", "upload"} <= set(stages)
    assert snap.outcome is not None and snap.outcome.pushed == (f"{hub.url}/alice/from-app",)
    assert "model.safetensors" in dict(snap.outcome.files) and "alice/base" in snap.outcome.card
    assert not (tmp_path / "job").exists()  # nothing large or lasting on the app's machine


@pytest.mark.parametrize("stage", ["merge", "upload"])
def test_cancel_mid_job_stops_it_and_leaves_no_repository(hub: HubServer, parents: dict[str, str],
                                                          tmp_path: Path, stage: str) -> None:
    _slow_jobs(hub, tmp_path)
    hub.jobs.root = tmp_path / "jobs"
    seen: list[Event] = []

    def hook(run, event: Event) -> None:  # noqa: ANN001
        seen.append(event)
        if event.stage == stage and not run.cancel_event.is_set():
            run.cancel()

    run = RunQueue(hook=hook).new_job()
    options = RunOptions(out_dir=tmp_path / "job" / "out", token=TOKEN, push="alice/cancelled", allow_local=False)
    run.start(parse_recipe(RECIPE, allow_local=False), options, job_dir=tmp_path / "job", keep=False,
              backend=Jobs(image=IMAGE))
    assert run.wait(180)
    assert run.snapshot().status == CANCELLED
    (job,) = hub.jobs.jobs.values()
    assert job.stage == "CANCELED"
    assert job.returncode == 130  # it stopped on SIGTERM as on a cancel, cleaning up (not killed)
    assert "alice/cancelled" not in hub.repos  # created during the upload and deleted again, or never made
    assert not list((job.root / "work").iterdir())  # the job's output folder was removed
    if stage == "upload":
        assert hub.stats.requests["create"] == 1 and hub.stats.requests["delete"] == 1


def test_failing_job_shows_its_last_log_lines_and_leaves_no_repository(hub: HubServer, parents: dict[str, str],
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    hub.inject("commit", "forbidden", times=None)  # the job's push is refused at the commit
    rc = main(["run", str(_recipe_file(tmp_path)), "--job", "--job-image", IMAGE, "--push", "alice/failed",
               "--token", TOKEN])
    err = capsys.readouterr().err
    (job,) = hub.jobs.jobs.values()
    assert rc == 2 and job.stage == "ERROR" and job.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the Hugging Face Job failed (Job failed with exit code: 2); last log lines: ")
    assert "error: your token is not allowed to upload to alice/failed" in last
    assert f"full log: {hub.url}/jobs/alice/{job.id}" in last
    assert "alice/failed" not in hub.repos
    assert "Traceback" not in job.log_text() + err


def test_token_without_jobs_permission_gets_one_line(hub: HubServer, parents: dict[str, str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    hub.jobs.forbid(TOKEN)
    rc = main(["run", str(_recipe_file(tmp_path)), "--job", "--job-image", IMAGE, "--push", "alice/merged",
               "--token", TOKEN])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and not hub.jobs.jobs and "alice/merged" not in hub.repos
    assert len(lines) == 1 and "may not run Jobs" in lines[0] and "'jobs'" in lines[0] and "run the merge here" \
        in lines[0]
    assert TOKEN not in err


def test_check_shows_the_flavor_time_cost_and_why_cheaper_ones_do_not_fit(hub: HubServer, parents: dict[str, str],
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    hub.jobs.hardware = [dict(h, ram="2 GB") if h["name"] == "cpu-basic" else h for h in hub.jobs.hardware]
    rc = main(["check", str(_recipe_file(tmp_path)), "--job", "--token", TOKEN])
    out = capsys.readouterr().out
    assert rc == 0
    report = check(parse_recipe(RECIPE, allow_local=False), token=TOKEN)
    needs = needs_from_report(report)
    seconds = run_seconds(needs, cores=8, gpu=False)
    usd = seconds / 60 * 0.0005  # cpu-upgrade's price per minute in the test Hub's table
    assert usd < 0.005
    assert "Hugging Face Jobs flavor: cpu-upgrade" in out
    assert "estimated cost < $0.01 ($0.03/hour)" in out
    assert f"cpu-basic does not fit: RAM 2.0 GB < {needs.ram_bytes / 1e9:.1f} GB needed" in out
    assert not hub.jobs.jobs  # a check creates nothing


def test_run_job_needs_a_push_target_and_an_image(hub: HubServer, parents: dict[str, str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGER_JOB_IMAGE", raising=False)
    recipe = str(_recipe_file(tmp_path))
    assert main(["run", recipe, "--job", "--token", TOKEN]) == 2
    assert "give the repository to push to (--push OWNER/NAME)" in capsys.readouterr().err
    assert main(["run", recipe, "--job", "--push", "alice/x", "--token", TOKEN]) == 2
    assert "no image to run the job in: give --job-image" in capsys.readouterr().err
    assert main(["run", recipe, str(tmp_path / "out"), "--job", "--push", "alice/x"]) == 2
    assert "drop OUT_DIR" in capsys.readouterr().err
    assert not hub.jobs.jobs


def test_job_log_replays_through_the_real_client(hub: HubServer, parents: dict[str, str]) -> None:
    """The test Hub's log stream, inspect and hardware answers as huggingface_hub 2.4 reads them."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    script = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)\n"
    info = api.run_job(image="python:3.12", command=["python", "-c", textwrap.dedent(script)], flavor="cpu-basic")
    lines = list(api.fetch_job_logs(job_id=info.id, follow=True))
    assert lines == ["line 0", "line 1", "line 2"]
    assert api.inspect_job(job_id=info.id).status.stage == "COMPLETED"
    assert [h.name for h in api.list_jobs_hardware()][:2] == ["cpu-basic", "cpu-upgrade"]
    started = time.monotonic()
    slow = api.run_job(image="python:3.12", command=["python", "-c", "import time; time.sleep(60)"])
    api.cancel_job(job_id=slow.id)
    assert api.wait_for_job(slow.id, timeout=30).status.stage == "CANCELED"
    assert time.monotonic() - started < 30


def test_app_page_checks_and_runs_on_jobs(hub: HubServer, parents: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's "Run on Hugging Face Jobs" choice, through gradio_client: check shows the plan, merge
    creates the job, follows it and shows the pushed repo and the job's URL."""
    import socket

    from gradio_client import Client

    import app as app_module
    from merger.app import demo

    monkeypatch.setenv("MERGER_JOB_IMAGE", IMAGE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = demo.Settings(False, "127.0.0.1", port, tmp_path / "outputs", tmp_path / "demo_models")
    blocks = app_module.build_app(settings, RunQueue())
    blocks.queue()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False, oauth_token=TOKEN)
        report, _ = client.predict(RECIPE, [], "jobs", api_name="/check")
        assert "**Hugging Face Jobs flavor: cpu-basic" in report and "estimated cost < $0.01" in report
        progress, log, result, card = client.predict(RECIPE, "app-merge", True, False, [], False, "jobs",
                                                     api_name="/merge")
    finally:
        blocks.close()
    (job,) = hub.jobs.jobs.values()
    assert 'data-status="done"' in progress, result
    assert f"{hub.url}/jobs/alice/{job.id}" in progress  # the job's page, linked from the progress panel
    assert f"**Model on the Hub**: [{hub.url}/alice/app-merge]" in result  # "Publish" was off: a job always pushes
    assert hub.repos["alice/app-merge"].private
    assert "job: Hugging Face Job" in log and "merge:" in log and TOKEN not in log + result + card + progress
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.safetensors"))


def test_ctrl_c_in_the_cli_cancels_the_job(hub: HubServer, parents: dict[str, str], tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    _slow_jobs(hub, tmp_path)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "cli_home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cli = subprocess.Popen([sys.executable, "-m", "merger", "run", str(_recipe_file(tmp_path)), "--job",
                            "--job-image", IMAGE, "--push", "alice/interrupted"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "merge [" not in seen:  # the job is merging: its progress reached the CLI
        line = cli.stderr.readline()
        assert line, seen
        seen += line
    cli.send_signal(signal.SIGINT)
    _, rest = cli.communicate(timeout=120)
    (job,) = hub.jobs.jobs.values()
    assert cli.returncode == 130 and job.stage == "CANCELED", seen + rest
    assert rest.strip().splitlines()[-1].startswith("cancelled: the Hugging Face Job was cancelled; nothing was pushed")
    assert "alice/interrupted" not in hub.repos and TOKEN not in seen + rest + job.log_text()


def test_a_recipe_that_fails_the_check_creates_no_job(hub: HubServer, parents: dict[str, str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(RECIPE.replace("alice/chat", "alice/chta"), encoding="utf-8")
    rc = main(["run", str(path), "--job", "--job-image", IMAGE, "--push", "alice/merged", "--token", TOKEN])
    err = capsys.readouterr().err
    assert rc == 2 and not hub.jobs.jobs and "alice/merged" not in hub.repos
    assert err.strip().splitlines()[-1].startswith("error: alice/chta was not found on the Hub")


def test_a_job_gets_every_option_of_a_local_run(hub: HubServer, parents: dict[str, str]) -> None:
    """The job's command carries what the pipeline does besides merging: memory budget, evaluation, GGUF
    verification policy, the remix link; and the job's own argument parser accepts every one of them."""
    from merger.__main__ import _parser
    from merger.compute.jobs import job_spec, plan_job

    recipe = parse_recipe(RECIPE, allow_local=False)
    options = RunOptions(out_dir=Path("."), token=TOKEN, push="alice/m", max_memory=123_000_000, evaluate=False,
                         eval_tokens=64, drop_failing_gguf=True, gguf=("Q8_0",), remixed_from="bob/original")
    command = job_spec(recipe, options, plan_job(recipe, options), IMAGE)["command"]
    args = _parser().parse_args(command[3:])
    assert (args.max_memory, args.no_eval, args.eval_tokens, args.gguf_drop_failing, args.gguf,
            args.remixed_from, args.push) == ("123000000", True, 64, True, "Q8_0", "bob/original", "alice/m")
    default = job_spec(recipe, RunOptions(out_dir=Path("."), token=TOKEN, push="alice/m"),
                       plan_job(recipe, options), IMAGE)["command"]
    args = _parser().parse_args(default[3:])
    assert (args.max_memory, args.no_eval, args.eval_tokens, args.gguf_drop_failing, args.remixed_from) == \
        (None, False, 256, False, None)
