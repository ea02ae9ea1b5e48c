"""The "Quantize a model" panel: its components and events (the job itself is merger.app.quantize_mode)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from ..errors import MergerError
from . import demo, page
from .quantize_mode import gguf_repo_name, quantize_request, run_quantize
from .results import render_log, render_outcome, render_progress
from .runs import RunQueue


def build(settings: demo.Settings, jobs: RunQueue, token: Callable, username: Callable, suggest: Callable) -> None:
    """Inside the page's Blocks: one model to GGUF files, with the merge's progress, log, Cancel and result."""
    allow_local = settings.allow_local

    def default_repo(model: str, profile: gr.OAuthProfile | None) -> str:
        return gguf_repo_name(model.strip(), username(profile)) if model and model.strip() else ""

    def register() -> tuple:
        job = jobs.new_job()
        return job.job_id, render_progress(job.snapshot()), gr.Button(interactive=True)

    def run(job_id: str, model: str, quants: list[str], publish: bool, repo: str, private: bool,
            oauth_token: gr.OAuthToken | None) -> Iterator[tuple[str, str, str]]:
        job = jobs.get(job_id) or jobs.new_job()
        job_dir = (Path(tempfile.mkdtemp(prefix=f"quantize-{job.job_id}-")) if settings.space
                   else settings.outputs_dir / job.job_id)
        try:
            request = quantize_request(model, quants or [], job_dir=job_dir, allow_local=allow_local,
                                       publish=publish or settings.space, repo=repo, private=private,
                                       token=token(oauth_token))
        except MergerError as e:
            job.cancel()
            yield "", "", page.error(e)
            return
        job.start(None, None, job_dir=job_dir, keep=not settings.space,
                  cache_dir=job_dir / "hub-cache" if settings.space else None,
                  task=functools.partial(run_quantize, request))
        for snap in demo.follow(job):
            yield render_progress(snap), render_log(snap), render_outcome(snap, "Quantized")

    with gr.Accordion("Quantize a model: one model straight to GGUF files, no merge", open=False,
                      elem_id="quantize"):
        job_id = gr.State("")
        with gr.Row():
            model = gr.Textbox(label="Model: a Hub repo ID or huggingface.co link (type to search)"
                               + (", or a local folder" if allow_local else ""), scale=3, elem_id="qm-model",
                               placeholder="org/name")
            repo = gr.Textbox(label="GGUF repo to publish to (OWNER/NAME-GGUF)", scale=2, elem_id="qm-repo")
        suggestions = gr.Radio(label="Matching models (pick one)", choices=[], visible=False, elem_id="qm-suggest")
        quants = gr.CheckboxGroup(label="GGUF files (llama.cpp)", choices=demo.gguf_choices(),
                                  value=list(demo.DEFAULT_QUANTS), elem_id="qm-quants")
        with gr.Row():
            publish = gr.Checkbox(label="Publish the files to the GGUF repo", value=settings.space, elem_id="qm-publish")
            private = gr.Checkbox(label="Private", value=True)
        with gr.Row():
            start = gr.Button("Quantize", variant="primary", elem_id="qm-start")
            cancel = gr.Button("Cancel", interactive=False, elem_id="qm-cancel")
        note = gr.Markdown(elem_id="qm-note")
        progress = gr.HTML(elem_id="qm-progress")
        log = gr.Textbox(label="Log", lines=6, max_lines=6, autoscroll=True, interactive=False, elem_id="qm-log")
        result = gr.Markdown(elem_id="qm-result")

    model.input(suggest, [model], [suggestions], trigger_mode="always_last", concurrency_id="suggest",
                concurrency_limit=8, show_progress="hidden")
    model.change(default_repo, [model], [repo], queue=False)
    suggestions.input(lambda picked: (picked, gr.Radio(visible=False)), [suggestions], [model, suggestions],
                      queue=False)
    start.click(register, None, [job_id, progress, cancel], queue=False).then(
        run, [job_id, model, quants, publish, repo, private], [progress, log, result], concurrency_id="merge",
        concurrency_limit=1, api_name="quantize").then(
        lambda: (gr.Button(interactive=False), ""), None, [cancel, note], queue=False)
    cancel.click(lambda j: page.alert("Cancelling: the job stops at its next step and removes what it wrote."
                                      if jobs.cancel(j) else "No job is running.", "note"), [job_id], [note],
                 queue=False)
