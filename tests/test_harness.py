"""`python -m merger eval`: lm-evaluation-harness on a tiny published merge and its parent, offline, with a
local task defined from JSON files (tests/lm_eval_tasks/), results committed to the merge's card; lm-eval's
accuracies checked against an independent float64 scorer of the same task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from merger.__main__ import main
from merger.app.tiny import make_tiny_model
from merger.eval.harness import eval_results_files, harness_metrics, results_table, with_table
from tests.hubserver import HubServer

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
CLOZE = TASKS / "tiny_cloze"


def cloze_task(folder: Path) -> Path:
    """A copy of tests/lm_eval_tasks/tiny_cloze whose data path is absolute (a job runs in its own folder)."""
    spec = yaml.safe_load((CLOZE / "tiny_cloze.yaml").read_text(encoding="utf-8"))
    spec["dataset_kwargs"]["data_files"]["test"] = str(CLOZE / "test.jsonl")
    (folder / "tiny_cloze").mkdir(parents=True)
    (folder / "tiny_cloze" / "tiny_cloze.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny float32 Llama (the parent) and a noisy fine-tune of it (the merge under test)."""
    parent = make_tiny_model(root / "parent", "llama", seed=51, num_layers=2, dtype=torch.float32)
    return parent, make_tiny_model(root / "merged", perturb_from=parent, seed=52, perturb_scale=0.3)


def reference_scores(folder: Path) -> tuple[float, float, float]:
    """(acc, acc_norm, smallest winning margin) of tiny_cloze, computed without lm-eval, in float64.

    lm-eval's definition for a zero-shot multiple_choice task (lm_eval/api/task.py, api/model.py,
    models/huggingface.py, version 0.4.13): the context is doc_to_text; each choice is scored as the
    continuation target_delimiter (" ") + choice; trailing spaces of the context move to the continuation;
    context + continuation is tokenised as a whole (with the tokenizer's own special tokens, here BOS) and
    the continuation's tokens are what follows the context's own tokenisation; its log-likelihood is the sum
    of log-softmax of the logits that predict those tokens. acc: argmax of the log-likelihoods is the gold
    index; acc_norm: argmax of log-likelihood / len(choice) in characters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    docs = [json.loads(line) for line in (CLOZE / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    hits, hits_norm, margin = 0, 0, math.inf
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            context, continuation = doc["question"], " " + choice
            spaces = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole = tokenizer(context + continuation)["input_ids"]
            n_context = len(tokenizer(context)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_context, len(whole))))
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
        for values in (lls, normed):
            top, second = sorted(values, reverse=True)[:2]
            margin = min(margin, top - second)
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == doc["answer"]
    return hits / len(docs), hits_norm / len(docs), margin


def test_lm_eval_accuracy_equals_an_independent_float64_scorer(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    include = cloze_task(tmp_path / "tasks")
    seen = set()
    for folder in tiny_pair(tmp_path):
        acc, acc_norm, margin = reference_scores(folder)
        assert margin > 1e-3  # no near-tie that float32 (lm-eval, dtype=auto) and float64 could order apart
        got = harness_metrics(str(folder), ["tiny_cloze"], include_path=include, batch_size=1)["tiny_cloze"]
        assert (got["acc,none"], got["acc_norm,none"]) == (acc, acc_norm), folder.name
        seen |= {acc, acc_norm}
    assert len(seen) > 1  # the two models and the two metrics do not all agree by construction


def test_eval_scores_merge_and_parent_and_commits_once(hub: HubServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the shipped task's data path is relative to the repo
    parent, merged = tiny_pair(tmp_path)
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
    # the headline of a task without a known benchmark is acc_norm
    assert (got_merged, got_parent) == (reference_scores(merged)[1], reference_scores(parent)[1])
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
