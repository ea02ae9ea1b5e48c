"""`python -m merger eval --job` and the app's Evaluate through the local Jobs endpoint (tests/hubjobs.py runs
each job as a subprocess): the job runs lm-eval on the tiny task, commits the card table in one commit, and
reports progress through its log; cancel mid-evaluation, a failing job, the flavor by model size; the token
only as a secret, in no log, argument or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from merger.__main__ import main
from merger.app.evaluate import Evaluations, render_scores
from merger.app.runs import CANCELLED
from merger.compute.evaljob import EvalJobs, EvalRequest, eval_needs, eval_seconds, task_tokens
from merger.compute.flavors import choose_flavor
from merger.compute.jobs import list_flavors
from merger.errors import CancelledError, MergerError
from tests.hubserver import HubServer
from tests.test_harness import cloze_task, reference_scores, tiny_pair

TOKEN = "hf_alice_write"
IMAGE = "hf.co/spaces/alice/llm-merger"
CARD = "---\nbase_model:\n- alice/parent\ntags:\n- merge\n---\n# merged\n\n## Reproduce this merge\n\nrun it\n"
# Imported by the job's Python at start-up: no network for datasets (as the in-process tests), and, for the
# cancel test, an evaluation slow enough that the cancel lands before the commit.
OFFLINE = "import os\nos.environ['HF_DATASETS_OFFLINE'] = '1'\n"
SLOW = """
import time
import merger.eval.harness as harness
_metrics = harness.harness_metrics
def harness_metrics(*args, **kwargs):
    time.sleep(30)
    return _metrics(*args, **kwargs)
harness.harness_metrics = harness_metrics
"""


@pytest.fixture
def published(hub: HubServer, tmp_path: Path) -> dict[str, Path]:
    """alice/parent and alice/merged (a card naming the parent) on the test Hub; jobs without network."""
    parent, merged = tiny_pair(tmp_path / "models")
    (merged / "README.md").write_text(CARD, encoding="utf-8")
    hub.upload_folder(parent, "alice/parent")
    hub.upload_folder(merged, "alice/merged")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(OFFLINE, encoding="utf-8")
    hub.jobs.extra_pythonpath.append(str(site))
    hub.jobs.root = tmp_path / "jobs"
    return {"parent": parent, "merged": merged, "site": site, "tasks": cloze_task(tmp_path / "tasks")}


def _all_files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def test_eval_job_scores_and_the_job_commits_the_table_once(hub: HubServer, published: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    commits = len(hub.commit_history("alice/merged"))
    rc = main(["eval", "alice/merged", "--job", "--job-image", IMAGE, "--tasks", "tiny_cloze", "--parents",
               "--include-path", str(published["tasks"]), "--token", TOKEN])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (job,) = hub.jobs.jobs.values()
    assert job.stage == "COMPLETED" and job.returncode == 0
    spec = job.spec
    assert spec["spaceId"] == "alice/llm-merger" and spec["flavor"] == "cpu-basic"  # cheapest; a tiny model fits
    assert spec["secrets"] == {"HF_TOKEN": TOKEN}
    assert spec["command"][:5] == ["python", "-m", "merger", "eval", "alice/merged"]
    assert {"--progress-lines", "--parents"} <= set(spec["command"]) and "cpu" in spec["command"]

    # the job's progress lines were the CLI's own progress bar; its result line became the printed scores
    log = job.log_text()
    assert "merger-event" in log and "merger-result" in log
    assert "Hugging Face Jobs flavor: cpu-basic" in err and "evaluate [" in err and "job [" in err
    merged_acc_norm, parent_acc_norm = reference_scores(published["merged"])[1], reference_scores(published["parent"])[1]
    assert f"alice/merged: tiny_cloze {merged_acc_norm:.4f}" in out and f"alice/parent: tiny_cloze {parent_acc_norm:.4f}" in out

    # one commit, by the job: the table with the independently computed scores, before the reproduce section
    history = hub.commit_history("alice/merged")
    assert len(history) == commits + 1 and history[0].message.startswith("Benchmark results (lm-eval)")
    card = hub.file_bytes("alice/merged", "README.md").decode()
    assert f"| **alice/merged** | {merged_acc_norm:.4f} |" in card and f"| alice/parent | {parent_acc_norm:.4f} |" in card
    assert card.index("## Benchmarks") < card.index("## Reproduce this merge")

    # the token: only the secret
    assert TOKEN not in log + out + err + " ".join(spec["command"]) + str(spec.get("environment"))
    assert TOKEN not in _all_files_text(hub.jobs.root)


def test_cancel_mid_evaluation_stops_the_job_and_leaves_the_repo_unchanged(hub: HubServer,
                                                                          published: dict[str, Path]) -> None:
    (published["site"] / "sitecustomize.py").write_text(OFFLINE + SLOW, encoding="utf-8")
    before = hub.repos["alice/merged"].branches["main"]
    evaluations = Evaluations(image=IMAGE)
    run = evaluations.start(evaluations.reserve(), EvalRequest("alice/merged", ("tiny_cloze",),
                                                               include_path=str(published["tasks"]), token=TOKEN))
    deadline = 120
    while not any(line.split("  ", 1)[-1].startswith("evaluate:") for line in run.snapshot().log) and deadline:
        run.wait(1.0)
        deadline -= 1
    assert deadline, run.snapshot().log  # the job reported that it is evaluating
    assert evaluations.cancel(run.id)
    assert run.wait(60)
    snap = run.snapshot()
    assert snap.status == CANCELLED and "Cancelled: the repository is unchanged." == render_scores(run)
    (job,) = hub.jobs.jobs.values()
    assert job.stage == "CANCELED" and job.returncode == 130  # stopped on SIGTERM by the eval command itself
    assert "cancelled: the evaluation was stopped before its results were committed" in job.log_text()
    assert hub.repos["alice/merged"].branches["main"] == before
    assert TOKEN not in job.log_text() + "\n".join(snap.log)


def test_failing_job_shows_its_last_log_lines_and_leaves_the_repo_unchanged(hub: HubServer,
                                                                           published: dict[str, Path],
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = hub.repos["alice/merged"].branches["main"]
    hub.inject("commit", "forbidden", times=None)  # the job's commit is refused
    rc = main(["eval", "alice/merged", "--job", "--job-image", IMAGE, "--tasks", "tiny_cloze", "--include-path",
               str(published["tasks"]), "--token", TOKEN])
    err = capsys.readouterr().err
    (job,) = hub.jobs.jobs.values()
    assert rc == 2 and job.stage == "ERROR" and job.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the Hugging Face Job failed (Job failed with exit code: 2); last log lines: ")
    assert "alice/merged" in last and f"full log: {hub.url}/jobs/alice/{job.id}" in last
    assert hub.repos["alice/merged"].branches["main"] == before
    assert "Traceback" not in job.log_text() + err and TOKEN not in job.log_text() + err


def test_app_evaluate_runs_the_same_job_and_shows_the_scores(hub: HubServer, published: dict[str, Path],
                                                             tmp_path: Path) -> None:
    import app as app_module
    from gradio_client import Client

    from merger.app import demo
    from tests.test_app import _free_port

    settings = demo.Settings(False, "127.0.0.1", _free_port(), tmp_path / "outputs", tmp_path / "demo_models")
    blocks = app_module.build_app(settings, evaluations=Evaluations(image=IMAGE, include_path=str(published["tasks"])))
    blocks.queue()
    blocks.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                  ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{settings.port}", verbose=False, oauth_token=TOKEN)
        progress, log, result = client.predict("alice/merged", "tiny_cloze", True, 0, "", api_name="/evaluate")
        _, _, refused = client.predict("alice/merged", " , ", False, 0, "", api_name="/evaluate")
    finally:
        blocks.close()
    assert 'data-status="done"' in progress, result
    stages = [line.split("  ", 1)[-1].split(":", 1)[0] for line in log.splitlines()]
    assert {"check", "job", "evaluate", "done"} <= set(stages), log
    merged, parent = (reference_scores(published[name])[1] for name in ("merged", "parent"))
    assert f"| alice/merged | {merged:.4f} |" in result and f"| alice/parent | {parent:.4f} |" in result
    (job,) = hub.jobs.jobs.values()
    assert f"Job: [{hub.url}/jobs/alice/{job.id}]" in result
    assert f"| **alice/merged** | {merged:.4f} |" in hub.file_bytes("alice/merged", "README.md").decode()
    assert refused == "✗ name at least one lm-eval task, e.g. arc_challenge,hellaswag"
    assert TOKEN not in progress + log + result + job.log_text()


def test_flavor_follows_the_model_sizes(hub: HubServer) -> None:
    flavors = list_flavors(TOKEN)
    tokens = task_tokens(["arc_challenge", "hellaswag"], None)

    def pick(sizes: list[int]) -> str:
        needs = eval_needs(sizes)
        return choose_flavor(flavors, needs, seconds=lambda f: eval_seconds(f, sizes, tokens)).flavor.name

    assert pick([500_000]) == "cpu-basic"  # a tiny model: the cheapest machine
    # a 7B bf16 merge (14.5 GB) and its parent: too slow on CPUs, 19 GB of GPU memory: the cheapest GPU that holds it
    assert pick([14_500_000_000, 14_500_000_000]) == "l4x1"
    # 30 GB of weights need the 80 GB GPU
    assert pick([30_000_000_000]) == "a100-large"
    assert task_tokens(["hellaswag"], 100) == pytest.approx(4e6 * 100 / 10042)
    with pytest.raises(MergerError, match="flavor t4-small cannot run this evaluation .*GPU memory 16.0 GB < 19.4 GB"):
        choose_flavor(flavors, eval_needs([14_500_000_000]), wanted="t4-small", what="this evaluation")


def test_eval_job_refuses_bad_input_before_creating_a_job(hub: HubServer, published: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGER_JOB_IMAGE", raising=False)
    assert main(["eval", "alice/merged", "--job", "--tasks", "tiny_cloze", "--token", TOKEN]) == 2
    assert "no image to run the job in: give --job-image" in capsys.readouterr().err
    assert main(["eval", "alice/merged", "--flavor", "cpu-basic", "--tasks", "tiny_cloze"]) == 2
    assert capsys.readouterr().err.strip() == "error: --flavor and --job-image are for --job"
    assert main(["eval", "alice/merged", "--job", "--no-push", "--job-image", IMAGE, "--token", TOKEN]) == 2
    assert "drop --no-push" in capsys.readouterr().err
    assert main(["eval", "alice/merged", "--job", "--job-image", IMAGE, "--token", "hf_bob_write"]) == 2
    assert "cannot publish under 'alice'" in capsys.readouterr().err  # checked before any job is created
    hub.jobs.forbid(TOKEN)
    assert main(["eval", "alice/merged", "--job", "--job-image", IMAGE, "--tasks", "tiny_cloze", "--token", TOKEN]) == 2
    assert "may not run Jobs" in capsys.readouterr().err
    assert not hub.jobs.jobs
    with pytest.raises(CancelledError):  # a cancel before the job exists: nothing is created
        handle = EvalJobs(image=IMAGE).submit(EvalRequest("alice/merged", ("tiny_cloze",), token=TOKEN))
        handle.cancel()
        handle.run(lambda event: None)
    evaluations = Evaluations(image=IMAGE)
    reserved = evaluations.reserve()  # the app's Cancel between the click and the start
    assert evaluations.cancel(reserved) and not evaluations.cancel("no-such-id")
    with pytest.raises(CancelledError):
        evaluations.start(reserved, EvalRequest("alice/merged", ("tiny_cloze",), token=TOKEN))
    assert not hub.jobs.jobs
