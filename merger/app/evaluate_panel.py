"""The "Benchmarks" panel: its components and events (the evaluation itself is merger.app.evaluate, on the
code path of `python -m merger eval --job`)."""

from __future__ import annotations

from typing import Callable, Iterator

import gradio as gr

from ..errors import MergerError
from ..eval.harness import DEFAULT_TASKS
from . import demo
from .evaluate import Evaluations, render_scores, request_from_form


def build(evaluations: Evaluations, token: Callable[[gr.OAuthToken | None], str | None]) -> None:
    """Inside the page's Blocks: a published merge, tasks, Evaluate and Cancel, the job's progress, log, scores."""

    def evaluate(eval_id: str, repo: str, tasks: str, parents: bool, limit: float | None, flavor: str,
                 oauth_token: gr.OAuthToken | None) -> Iterator[tuple[str, str, str]]:
        """Benchmarks as a Hugging Face Job on the user's account."""
        try:
            request = request_from_form(repo, tasks, parents, limit, token=token(oauth_token),
                                        include_path=evaluations.include_path)
            run = evaluations.start(eval_id or evaluations.reserve(), request, flavor=(flavor or "").strip() or None)
        except MergerError as e:
            yield "", "", demo.render_error(e)
            return
        for snap in demo.follow(run):
            yield demo.render_progress(snap), demo.render_log(snap), render_scores(run)

    def cancel(eval_id: str) -> str:
        try:
            return ("Cancelling the Hugging Face Job: it stops before committing anything."
                    if evaluations.cancel(eval_id) else "No evaluation is running.")
        except MergerError as e:
            return demo.render_error(e)

    eval_id = gr.State("")
    with gr.Accordion("Benchmarks: lm-evaluation-harness as a Hugging Face Job on your account", open=False,
                      elem_id="evaluate-panel"):
        gr.Markdown("Scores a published merge (and the parents its card names) and commits a merge-vs-parents "
                    "table to its card and `.eval_results/`, in one commit, from the job itself. The job runs on "
                    "the cheapest hardware that holds the largest model; it is billed to your account.")
        with gr.Row():
            repo = gr.Textbox(label="Published merge (owner/name)", scale=3, elem_id="eval-repo")
            tasks = gr.Textbox(label="lm-eval tasks", value=",".join(DEFAULT_TASKS), scale=4, elem_id="eval-tasks")
        with gr.Row():
            parents = gr.Checkbox(label="Also the parents", value=True, elem_id="eval-parents")
            limit = gr.Number(label="Examples per task (0: all)", value=0, precision=0, elem_id="eval-limit")
            flavor = gr.Textbox(label="Jobs hardware (empty: cheapest that fits)", elem_id="eval-flavor")
        with gr.Row():
            button = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
            stop = gr.Button("Cancel evaluation", variant="stop", elem_id="cancel-evaluate")
        progress = gr.HTML(elem_id="eval-progress")
        log = gr.Textbox(label="Job log", lines=6, max_lines=6, autoscroll=True, interactive=False, elem_id="eval-log")
        result = gr.Markdown(elem_id="eval-result")
    button.click(evaluations.reserve, None, [eval_id], queue=False).then(
        evaluate, [eval_id, repo, tasks, parents, limit, flavor], [progress, log, result],
        concurrency_id="evaluate", concurrency_limit=4, api_name="evaluate")
    stop.click(cancel, [eval_id], [result], queue=False, api_name="cancel_evaluate")
