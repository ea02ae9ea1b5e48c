"""The Gradio app: pick models and a recipe, check it in seconds, merge with live progress, publish.

UI and wiring only: the logic lives in merger.app.demo (recipes, names, rendering), merger.app.runs (queued,
cancellable jobs) and merger.pipeline.

Local mode (SPACE_ID unset, `make run`): serves http://127.0.0.1:7860 offline. Tiny demo models are
generated into ./demo_models/ on first start and results go to ./outputs/<job>/. There is no OAuth off
a Space (gr.LoginButton would call whoami() while the page is built and fail offline), so no sign-in
button is shown: publishing locally uses the token in the HF_TOKEN environment variable, and API
clients may pass one with gradio_client.Client(url, oauth_token=...).

Space mode (SPACE_ID set): binds 0.0.0.0; "Sign in with Hugging Face" (OAuth) gives each user's own
token for their downloads and pushes; only Hub repo IDs are accepted; each job runs in a temporary
folder that is removed after the push.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

if os.environ.get("SPACES_ZERO_GPU"):  # a ZeroGPU Space: `spaces` must come before anything touches CUDA
    import spaces  # noqa: F401

from merger.app import demo, where
from merger.app.demo import Settings

demo.quiet_environment()  # before gradio and huggingface_hub are imported

import gradio as gr  # noqa: E402

from merger import pipeline  # noqa: E402
from merger.errors import MergerError  # noqa: E402
from merger.app.gallery import gallery_entry, load_gallery, recipe_from_hub  # noqa: E402
from merger.app.runs import RunQueue  # noqa: E402
from merger.methods import METHODS  # noqa: E402
from merger.recipe import parse_recipe  # noqa: E402

CSS = """
.merge-progress progress { width: 100%; height: 14px; }
.merge-progress-head { font-weight: 600; }
.merge-progress-msg { font-family: monospace; font-size: 0.85em; opacity: 0.8; }
#recipe-status p { margin: 0; }
"""
TITLE = "Merge LLMs: check, merge, GGUF, publish"


def _token(settings: Settings, oauth_token: gr.OAuthToken | None) -> str | None:
    return demo.resolve_token(settings, oauth_token.token if oauth_token else None)


def _username(profile: gr.OAuthProfile | None) -> str | None:
    return profile.username if profile else None


def build_app(settings: Settings, manager: RunQueue | None = None) -> gr.Blocks:
    """The page; `manager` may carry a test hook that paces jobs."""
    jobs = manager or RunQueue()
    allow_local = settings.allow_local
    gallery = load_gallery()
    demo_models = [str(p) for p in demo.ensure_demo_models(settings.demo_dir).values()] if allow_local else []
    start_models = demo_models[:2] if allow_local else demo.recipe_models(gallery_entry("slerp.yml").text)
    start_text = demo.starting_recipe(start_models, "slerp")

    def recipe_update(text: str, profile: gr.OAuthProfile | None):  # noqa: ANN202 - gradio updates
        return (text, "\n".join(demo.recipe_models(text)), demo.recipe_method(text) or gr.skip(),
                demo.default_repo_name(text, _username(profile)), demo.recipe_status(text, allow_local=allow_local))

    def from_method(models_text: str, method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        try:
            models = demo.parse_model_list(models_text, allow_local=allow_local)
            text = demo.starting_recipe(models, method)
        except MergerError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), demo.render_error(e)
        return recipe_update(text, profile)

    def from_models(models_text: str, text: str, method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        try:
            models = demo.parse_model_list(models_text, allow_local=allow_local)
            if models == demo.recipe_models(text):
                return (gr.skip(),) * 4 + (demo.recipe_status(text, allow_local=allow_local),)
            new = demo.sync_models_into_recipe(text, models, method)
        except MergerError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), demo.render_error(e)
        return recipe_update(new, profile)

    def use_demo(method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        return from_method("\n".join(demo.models_for_method(demo_models, method)), method, profile)

    def from_gallery(key: str, models_text: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        models = [m.strip() for m in (models_text or "").splitlines() if m.strip()]
        models += [m for m in demo_models if m not in models]  # locally, the demo models fill any gap
        return recipe_update(demo.gallery_recipe(gallery_entry(key).text, models), profile)

    def from_hub(repo: str, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        try:
            text = recipe_from_hub(repo.strip(), token=_token(settings, oauth_token))
        except MergerError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), demo.render_error(e)
        return recipe_update(text, profile)

    def on_edit(text: str):  # noqa: ANN202
        models = demo.recipe_models(text)
        return ("\n".join(models) if models else gr.skip(), demo.recipe_method(text) or gr.skip(),
                demo.recipe_status(text, allow_local=allow_local))

    def check(text: str, quants: list[str], run_where: str, oauth_token: gr.OAuthToken | None) -> tuple[str, str]:
        """Pre-flight check: configs and headers only, so it answers in seconds."""
        try:
            recipe = parse_recipe(text, allow_local=allow_local)
            token = _token(settings, oauth_token)
            report = pipeline.check(recipe, token=token, gguf=tuple(quants or ()))
            plan = where.plan_markdown(run_where, recipe, report, token=token, quants=tuple(quants or ()))
        except Exception as e:  # one line for the user either way; a bug also goes to the server log
            if not isinstance(e, MergerError):
                logging.getLogger("merger.app").exception("check failed")
            return demo.render_error(e), demo.render_error(e)
        rendered = demo.render_check(report) + (f"\n\n{plan}" if plan else "")
        return rendered, demo.recipe_status(text, allow_local=allow_local)

    def register() -> tuple[str, str]:
        """Create the job at click time, so Cancel works while it waits in the queue."""
        job = jobs.new_job()
        return job.job_id, demo.render_progress(job.snapshot())

    def run_merge(job_id: str, text: str, repo_name: str, private: bool, publish: bool, quants: list[str],
                  run_where: str, oauth_token: gr.OAuthToken | None) -> Iterator[tuple[str, str, str, str]]:
        """Start the job when the queue gives it its turn, then stream its progress and result."""
        job = jobs.get(job_id) or jobs.new_job()
        token = _token(settings, oauth_token)
        try:
            request = demo.job_request(settings, text, repo_name, private=private,
                                       publish=publish or run_where == where.JOBS, quants=quants or (),
                                       token=token, job_id=job.job_id)
            backend = where.backend(run_where, token=token)
        except MergerError as e:
            job.cancel()
            yield "", "", demo.render_error(e), ""
            return
        job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep, backend=backend)
        # ZeroGPU: the merge step must run in this event's thread, inside its GPU window (see merger.compute)
        for snap in demo.follow(job, serve=getattr(backend, "serve", None)):
            card = demo.card_markdown(snap.outcome.card) if snap.outcome else ""
            yield demo.render_progress(snap), demo.render_log(snap), demo.render_outcome(snap), card

    def cancel(job_id: str) -> str:
        return ("Cancelling: the job stops at its next step and removes what it wrote."
                if jobs.cancel(job_id) else "No job is running.")

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        job_id = gr.State("")
        with gr.Row():
            gr.Markdown(f"# {TITLE}\n" + (
                "Sign in to use your own Hugging Face account for downloads and publishing."
                if settings.space else
                "**Local mode**: works offline with the demo models; results go to `outputs/`. "
                "Publishing uses the token in `HF_TOKEN`."))
            if settings.space:
                gr.LoginButton(scale=0, min_width=220)
        with gr.Row():
            with gr.Column(scale=2):
                models_box = gr.Textbox(label="Models (Hub repo IDs, one per line, @revision allowed)",
                                        value="\n".join(start_models), lines=4, elem_id="models-box")
                if allow_local:
                    demo_button = gr.Button("Use the demo models", size="sm", elem_id="use-demo")
                method = gr.Dropdown(label="Method (writes a starting recipe)", value="slerp",
                                     choices=[(f"{m.pretty_name} ({name})", name) for name, m in METHODS.items()],
                                     elem_id="method")
                gallery_pick = gr.Radio(label="Recipe gallery", choices=[(e.title, e.key) for e in gallery],
                                        elem_id="gallery")
                gr.Markdown("\n".join(f"- **{e.title}**: {e.when}" for e in gallery))
                with gr.Row():
                    hub_repo = gr.Textbox(label="Load the recipe of a merged model on the Hub", scale=3,
                                          placeholder="org/model", elem_id="hub-repo")
                    hub_load = gr.Button("Load", scale=1, size="sm", elem_id="hub-load")
            with gr.Column(scale=3):
                editor = gr.Code(value=start_text, language="yaml", label="Recipe (mergekit YAML)",
                                 lines=18, interactive=True, elem_id="editor")
                status = gr.Markdown(demo.recipe_status(start_text, allow_local=allow_local), elem_id="recipe-status")
        with gr.Row():
            repo_name = gr.Textbox(label="Output repo name", value=demo.default_repo_name(start_text),
                                   elem_id="repo-name", scale=3)
            private = gr.Checkbox(label="Private", value=True, scale=1)
            publish = gr.Checkbox(label="Publish to the Hub", value=settings.space, scale=1, elem_id="publish")
        quants = gr.CheckboxGroup(label="GGUF files (llama.cpp)", choices=demo.gguf_choices(),
                                  value=list(demo.DEFAULT_QUANTS), elem_id="quants")
        run_where = gr.Radio(label="Where to merge", choices=where.choices(), value=where.HERE, elem_id="where",
                             info="Hugging Face Jobs run on your own account's hardware (pay per minute) and push "
                                  "the result themselves; Check shows the hardware, time and cost first. They need "
                                  "the 'jobs' permission, asked for at sign-in.")
        with gr.Row():
            check_button = gr.Button("Check", elem_id="check")
            merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        report = gr.Markdown(elem_id="report")
        progress = gr.HTML(elem_id="progress")
        log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="log")
        result = gr.Markdown(elem_id="result")
        with gr.Accordion("Model card (README.md of the output)", open=False):
            card = gr.Markdown(elem_id="card")

        recipe_outputs = [editor, models_box, method, repo_name, status]
        method.input(from_method, [models_box, method], recipe_outputs, queue=False)
        models_box.blur(from_models, [models_box, editor, method], recipe_outputs, queue=False)
        if allow_local:
            demo_button.click(use_demo, [method], recipe_outputs, queue=False)
        gallery_pick.input(from_gallery, [gallery_pick, models_box], recipe_outputs, queue=False)
        hub_load.click(from_hub, [hub_repo], recipe_outputs, concurrency_id="check", concurrency_limit=4)
        editor.input(on_edit, [editor], [models_box, method, status], queue=False, trigger_mode="always_last")
        check_button.click(check, [editor, quants, run_where], [report, status], concurrency_id="check",
                           concurrency_limit=4, api_name="check")
        merge_button.click(register, None, [job_id, progress], queue=False).then(
            run_merge, [job_id, editor, repo_name, private, publish, quants, run_where], [progress, log, result, card],
            concurrency_id="merge", concurrency_limit=1, api_name="merge")
        cancel_button.click(cancel, [job_id], [report], queue=False)
    return app


def main() -> None:
    where.prepare()  # ZeroGPU registers its @spaces.GPU functions at start-up
    settings = demo.settings_from_env()
    app = build_app(settings)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=settings.host, server_port=settings.port, ssr_mode=False, css=CSS,
               footer_links=["gradio"])


if __name__ == "__main__":
    main()
