"""Benchmarks with lm-evaluation-harness (the `lm-eval` package) on a published merge and its parents,
and the results written back to the merge's repository in one commit: a table in the card (merge vs each
parent) and `.eval_results/<task>.yaml` files for tasks whose Hub benchmark dataset is known.

lm-eval is an optional dependency (`pip install lm-eval`): it is heavy and only this command needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergerError

DEFAULT_TASKS = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k")
# task -> (Hub benchmark dataset, the metric people quote for it)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "arc_challenge": ("allenai/ai2_arc", "acc_norm"),
    "hellaswag": ("Rowan/hellaswag", "acc_norm"),
    "mmlu": ("cais/mmlu", "acc"),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "acc"),
    "winogrande": ("allenai/winogrande", "acc"),
    "gsm8k": ("openai/gsm8k", "exact_match,strict-match"),
}
START, END = "<!-- merger:benchmarks -->", "<!-- /merger:benchmarks -->"

Scores = dict[str, float]  # task -> the task's headline metric


def _lm_eval():  # noqa: ANN202 - the module
    try:
        import lm_eval
    except ImportError:
        raise MergerError("benchmarks need lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval


def _headline(task: str, metrics: Mapping[str, Any]) -> float:
    wanted = BENCHMARKS.get(task, ("", ""))[1]
    for key in ([wanted] if wanted else []) + ["acc_norm,none", "acc,none", "exact_match,strict-match"]:
        key = key if "," in key else f"{key},none"
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    numbers = [v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"]
    if not numbers:
        raise MergerError(f"lm-eval reported no score for {task}")
    return float(numbers[0])


def harness_metrics(model: str, tasks: Sequence[str], *, include_path: str | Path | None = None,
                    limit: int | None = None, device: str = "cpu", batch_size: str | int = "auto",
                    token: str | None = None) -> dict[str, dict[str, Any]]:
    """lm-eval's results for one model (a Hub repo id or a local folder): {task: {"acc,none": ..., ...}}."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    if token:
        os.environ["HF_TOKEN"] = token  # transformers and datasets read it; never printed
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MergerError(f"unknown lm-eval task(s) {', '.join(unknown)}; e.g. {', '.join(DEFAULT_TASKS)}")
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=auto", tasks=list(tasks),
                                      batch_size=batch_size, device=device, limit=limit, task_manager=manager,
                                      verbosity="ERROR")
    except (OSError, ValueError) as exc:
        raise MergerError(f"lm-eval could not evaluate {model}: {str(exc).splitlines()[0]}") from None
    return {task: dict(out["results"][task]) for task in tasks}


def run_harness(model: str, tasks: Sequence[str], **options: Any) -> Scores:
    """Score one model on `tasks`: {task: headline metric} (options as for harness_metrics)."""
    return {task: _headline(task, metrics) for task, metrics in harness_metrics(model, tasks, **options).items()}


def results_table(model: str, scores: Scores, parents: Mapping[str, Scores], *, limit: int | None) -> list[str]:
    """Markdown: one row per model (merge first), one column per task, between the card's markers."""
    tasks = list(scores)
    lines = [START, "## Benchmarks", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
             f"| **{model}** | " + " | ".join(f"{scores[t]:.4f}" for t in tasks) + " |"]
    for name, s in parents.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[t]:.4f}" if t in s else "" for t in tasks) + " |")
    sample = f", first {limit} examples per task" if limit else ""
    lines += ["", f"Scored with [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) "
                  f"(`python -m merger eval`{sample}).", END]
    return lines


def with_table(card: str, table: Sequence[str]) -> str:
    """The card with its benchmarks section replaced (or added before the reproduce section / at the end)."""
    block = "\n".join(table)
    if START in card and END in card:
        return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, card, flags=re.DOTALL)
    anchor = card.find("## Reproduce this merge")
    if anchor >= 0:
        return card[:anchor] + block + "\n\n" + card[anchor:]
    return card.rstrip("\n") + "\n\n" + block + "\n"


def eval_results_files(scores: Scores, *, source_url: str) -> dict[str, str]:
    """`.eval_results/<task>.yaml` contents (the Hub's format) for tasks with a known benchmark dataset."""
    from huggingface_hub import EvalResultEntry
    from huggingface_hub._eval_results import eval_result_entries_to_yaml

    files = {}
    for task, value in scores.items():
        if task not in BENCHMARKS:
            continue
        entry = EvalResultEntry(dataset_id=BENCHMARKS[task][0], task_id=task, value=round(value * 100, 2),
                                source_url=source_url, source_name="python -m merger eval")
        files[f".eval_results/{task}.yaml"] = yaml.safe_dump(eval_result_entries_to_yaml([entry]), sort_keys=False)
    return files


def card_parents(card: Any) -> list[str]:
    """The parents a merge's card names (its base_model: one id or a list)."""
    base = card.data.base_model
    return [base] if isinstance(base, str) else list(base or [])


def merge_and_parents(repo_id: str, *, parents: bool, token: str | None) -> tuple[Path, list[str]]:
    """The merge's card (downloaded) and the parents to evaluate beside it (none unless `parents`)."""
    from huggingface_hub import ModelCard

    from ..hub import _api, _call, validate_repo_id

    validate_repo_id(repo_id)
    card_path = _call(lambda: _api(token).hf_hub_download(repo_id, "README.md"), repo_id=repo_id, token=token)
    return Path(card_path), card_parents(ModelCard.load(card_path)) if parents else []


def evaluate_repo(repo_id: str, tasks: Sequence[str], *, parents: bool, token: str | None,
                  include_path: str | Path | None = None, limit: int | None = None, device: str = "cpu",
                  push: bool = True, progress: Callable[[str, float], None] | None = None,
                  committing: Callable[[bool], None] | None = None) -> tuple[Scores, dict[str, Scores]]:
    """Benchmark a published merge (and its parents, from its card's base_model), then commit the table
    and the eval results files to it in one commit. `progress(message, fraction of the models done)`;
    `committing(True)` just before the commit and `committing(False)` after it (a cancel must not cut it)."""
    from huggingface_hub import CommitOperationAdd

    from ..hub import _api, _call, fetch_model, hub_endpoint

    say = progress or (lambda message, fraction: None)
    card_path, parent_ids = merge_and_parents(repo_id, parents=parents, token=token)

    def local(repo: str) -> str:  # through our Hub layer: pinned, HF_ENDPOINT honoured, one-line errors
        return str(fetch_model(repo, token=token)[1])

    models = [repo_id, *parent_ids]
    results: dict[str, Scores] = {}
    for i, name in enumerate(models):
        say(f"evaluating {'parent ' if i else ''}{name} on {', '.join(tasks)} ({i + 1} of {len(models)})",
            i / len(models))
        results[name] = run_harness(local(name), tasks, include_path=include_path, limit=limit, device=device,
                                    token=token)
    scores = results.pop(repo_id)
    if push:
        text = with_table(card_path.read_text(encoding="utf-8"), results_table(repo_id, scores, results, limit=limit))
        ops = [CommitOperationAdd("README.md", text.encode("utf-8"))]
        ops += [CommitOperationAdd(name, body.encode("utf-8")) for name, body in
                eval_results_files(scores, source_url=f"{hub_endpoint()}/{repo_id}").items()]
        say("committing the results (card table and .eval_results/)", 1.0)
        if committing:
            committing(True)
        try:
            _call(lambda: _api(token).create_commit(repo_id, ops, commit_message="Benchmark results (lm-eval)"),
                  repo_id=repo_id, token=token, verb="write")
        finally:
            if committing:
                committing(False)
    return scores, results
