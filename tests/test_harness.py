"""`python -m merger eval`: lm-evaluation-harness on a tiny published merge and its parent, offline, with a
local task defined from JSON files (tests/lm_eval_tasks/), results committed to the merge's card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from merger.__main__ import main
from merger.app.tiny import make_tiny_model
from merger.eval.harness import eval_results_files, results_table, with_table
from tests.hubserver import HubServer

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def test_eval_scores_merge_and_parent_and_commits_once(hub: HubServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the task's data path is relative to the repo
    parent = make_tiny_model(tmp_path / "parent", "llama", seed=51, num_layers=2, dtype=torch.float32)
    merged = make_tiny_model(tmp_path / "merged", perturb_from=parent, seed=52, perturb_scale=0.3)
    (merged / "README.md").write_text("---\nbase_model:\n- alice/parent\ntags:\n- merge\n---\n# merged\n\n"
                                      "## Reproduce this merge\n\nrun it\n")
    hub.upload_folder(parent, "alice/parent")
    hub.upload_folder(merged, "alice/merged")
    commits_before = len(hub.repos["alice/merged"].commits) if hasattr(hub.repos["alice/merged"], "commits") else None
    rc = main(["eval", "alice/merged", "--tasks", "tiny_cloze", "--parents", "--include-path", str(TASKS),
               "--token", "hf_alice_write"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = dict(line.split(": ", 1) for line in out.out.splitlines() if line.startswith("alice/"))
    got_merged = float(lines["alice/merged"].split()[-1])
    got_parent = float(lines["alice/parent"].split()[-1])
    for got in (got_merged, got_parent):  # 8 examples: accuracy is a multiple of 1/8
        assert 0.0 <= got <= 1.0 and (got * 8) == pytest.approx(round(got * 8))
    from merger.hub import download_file

    card = download_file("alice/merged", "README.md", token="hf_alice_write").read_text()
    assert "| **alice/merged** | " + f"{got_merged:.4f} |" in card and f"| alice/parent | {got_parent:.4f} |" in card
    assert card.index("## Benchmarks") < card.index("## Reproduce this merge")
    if commits_before is not None:
        assert len(hub.repos["alice/merged"].commits) == commits_before + 1
    assert "hf_alice_write" not in out.out + out.err


def test_eval_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "alice/merged", "--tasks", " , "]) == 2
    assert capsys.readouterr().err.strip() == "error: --tasks is empty; name lm-eval tasks, e.g. arc_challenge,hellaswag"
    assert main(["eval", "not a repo", "--tasks", "tiny_cloze"]) == 2
    assert "is not a valid repository name" in capsys.readouterr().err


def test_card_table_is_replaced_not_duplicated_and_eval_results_use_the_hub_format() -> None:
    table = results_table("me/m", {"arc_challenge": 0.5, "tiny": 0.25}, {"p/a": {"arc_challenge": 0.4}}, limit=10)
    card = with_table("# m\n\n## Reproduce this merge\n", table)
    again = with_table(card, results_table("me/m", {"arc_challenge": 0.6, "tiny": 0.3}, {}, limit=None))
    assert again.count("## Benchmarks") == 1 and "0.6000" in again and "0.5000" not in again
    assert "| p/a | 0.4000 |  |" in card and "first 10 examples per task" in card
    files = eval_results_files({"arc_challenge": 0.5123, "tiny": 0.3}, source_url="https://hf.co/me/m")
    assert list(files) == [".eval_results/arc_challenge.yaml"]
    entry = yaml.safe_load(files[".eval_results/arc_challenge.yaml"])[0]
    assert entry["dataset"] == {"id": "allenai/ai2_arc", "task_id": "arc_challenge"} and entry["value"] == 51.23
    assert entry["source"]["url"] == "https://hf.co/me/m"
