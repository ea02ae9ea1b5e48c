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
import re
from typing import Any, Iterator

if os.environ.get("SPACES_ZERO_GPU"):  # a ZeroGPU Space: `spaces` must come before anything touches CUDA
    import spaces  # noqa: F401

from merger.app import demo, where
from merger.app.demo import Settings

demo.quiet_environment()  # before gradio and huggingface_hub are imported
demo.space_environment()

import gradio as gr  # noqa: E402

from merger.errors import MergerError  # noqa: E402
from merger.app.chat import ChatSessions, resolve_gguf  # noqa: E402
from merger.app.gallery import fit_layer_ranges, gallery_entry, load_gallery, recipe_from_hub  # noqa: E402
from merger.app.runs import RunQueue  # noqa: E402
from merger.app import browser, hubsearch, page, quantize_panel, remix, share  # noqa: E402
from merger.app.gallery.community import KEY_PREFIX as COMMUNITY_PREFIX, safe_load_community  # noqa: E402
from merger.app.lineage import render_svg  # noqa: E402
from merger.app import evaluate_panel  # noqa: E402
from merger.app.evaluate import Evaluations  # noqa: E402
from merger.methods import METHODS  # noqa: E402

CSS = page.CSS
TITLE = "Merge LLMs: check, merge, GGUF, publish"


def _token(settings: Settings, oauth_token: gr.OAuthToken | None) -> str | None:
    return demo.resolve_token(settings, oauth_token.token if oauth_token else None)


def _username(profile: gr.OAuthProfile | None) -> str | None:
    return profile.username if profile else None


def build_app(settings: Settings, manager: RunQueue | None = None, evaluations: Evaluations | None = None) -> gr.Blocks:
    """The page; `manager` may carry a test hook that paces jobs; `evaluations` runs the Benchmarks panel's jobs."""
    jobs = manager or RunQueue()
    chats = ChatSessions()
    allow_local = settings.allow_local
    gallery = load_gallery()
    demo_models = [str(p) for p in demo.ensure_demo_models(settings.demo_dir).values()] if allow_local else []
    start_models = demo_models[:2] if allow_local else demo.recipe_models(gallery_entry("slerp.yml").text)
    start_text = demo.starting_recipe(start_models, "slerp")

    def recipe_update(text: str, profile: gr.OAuthProfile | None):  # noqa: ANN202 - gradio updates
        return (text, "\n".join(demo.recipe_models(text)), demo.recipe_method(text) or gr.skip(),
                demo.default_repo_name(text, _username(profile)), _status(text))

    def _status(text: str) -> str:
        return page.status_box(demo.recipe_status(text, allow_local=allow_local))

    def from_method(models_text: str, method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        """A starting recipe; the method box itself is not rewritten (that would drop its keyboard focus)
        and the gallery choice is cleared (the recipe is no longer that example)."""
        try:
            models = demo.parse_model_list(hubsearch.hub_refs_in_lines(models_text), allow_local=allow_local)
            text = demo.starting_recipe(models, method)
        except MergerError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), page.error(e), gr.skip()
        text, models_value, _, name, status_md = recipe_update(text, profile)
        return text, models_value, gr.skip(), name, status_md, None

    def from_models(models_text: str, text: str, method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        try:
            cleaned = hubsearch.hub_refs_in_lines(models_text)  # pasted huggingface.co links become org/name
            models = demo.parse_model_list(cleaned, allow_local=allow_local)
            if models == demo.recipe_models(text):
                return (gr.skip(), cleaned if cleaned != models_text else gr.skip(), gr.skip(), gr.skip(),
                        _status(text))
            new = demo.sync_models_into_recipe(text, models, method)
        except MergerError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), page.error(e)
        return recipe_update(new, profile)

    def use_demo(method: str, profile: gr.OAuthProfile | None):  # noqa: ANN202
        return from_method("\n".join(demo.models_for_method(demo_models, method)), method, profile)

    def from_gallery(key: str, models_text: str, profile: gr.OAuthProfile | None,
                     oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        """The example with the user's models put in (layer ranges scaled to their depth); the choice is
        cleared afterwards so that picking the same example again restores it."""
        entry = gallery_entry(key)
        if key.startswith(COMMUNITY_PREFIX):  # a community recipe names its own models: load it as shared
            return (*recipe_update(entry.text, profile), None)
        models = [m.strip() for m in (models_text or "").splitlines() if m.strip()]
        models += [m for m in demo_models if m not in models]  # locally, the demo models fill any gap
        text = demo.gallery_recipe(entry.text, models)
        note = ""
        if entry.layers and text != entry.text:
            try:
                text = fit_layer_ranges(text, entry.layers,
                                        lambda m: demo.layer_count(m, _token(settings, oauth_token)))
                note = f" Its layer ranges were scaled from {entry.layers}-layer models to yours."
            except MergerError as e:
                note = f" Its layer ranges are for {entry.layers}-layer models ({e})."
        edited, models_value, method_value, name, status_md = recipe_update(text, profile)
        return (edited, models_value, method_value, name,
                status_md + page.alert(f"Gallery example **{entry.title}** loaded.{note}", "note"), None)

    def from_hub(repo: str, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        """A Hub model's recipe; what went wrong loading it is said under the Load box, not as a recipe error."""
        from merger.hub import hub_endpoint

        try:
            ref = hubsearch.hub_ref(repo, "Load", endpoint=hub_endpoint())
            text = recipe_from_hub(ref, token=_token(settings, oauth_token))
        except MergerError as e:
            return (gr.skip(),) * 5 + (page.error(e), gr.skip())
        return (*recipe_update(text, profile), page.alert(f"Loaded the recipe of `{ref}`.", "ok"), ref)

    def suggest(query: str, request: gr.Request, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        """Hub models whose id contains what is typed (debounced per visitor; see merger.app.hubsearch)."""
        try:
            found = SUGGESTER.suggest(query, token=_token(settings, oauth_token),
                                      visitor=request.session_hash if request else "")
        except MergerError:
            found = []
        if found is None:
            return gr.skip()
        return gr.Radio(choices=found, value=None, visible=bool(found))

    def on_edit(text: str):  # noqa: ANN202
        models = demo.recipe_models(text)
        return ("\n".join(models) if models else gr.skip(), demo.recipe_method(text) or gr.skip(), _status(text))

    def add_model(picked: str, models_text: str):  # noqa: ANN202
        lines = [m for m in (models_text or "").splitlines() if m.strip()]
        return "\n".join(lines + ([picked] if picked and picked not in lines else [])), "", gr.Radio(visible=False)

    def check(text: str, quants: list[str], run_where: str, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        """Pre-flight check: configs and headers only, so it answers in seconds. Remembers the exact text it
        checked, so the report can be marked stale on the next edit."""
        try:
            token = _token(settings, oauth_token)
            report = demo.check_report(settings, text, quants or (), token, here=run_where != where.JOBS)
            plan = where.plan_markdown(run_where, report.recipe, report, token=token, quants=tuple(quants or ()))
        except Exception as e:  # one line for the user either way; a bug also goes to the server log
            if not isinstance(e, MergerError):
                logging.getLogger("merger.app").exception("check failed")
            md = page.error(e)
            return md, gr.skip(), page.checked(text, False, md)
        md = demo.render_check(report) + (f"\n\n{plan}" if plan else "")
        return md, _status(text), page.checked(text, report.ok, md)

    def register(text: str, last: dict | None):  # noqa: ANN202
        """Create the job at click time, so Cancel works while it waits in the queue; a recipe whose last
        Check failed does not start."""
        blocked = page.merge_gate(text, last)
        if blocked:
            return BLOCKED, "", gr.skip(), page.alert(f"✗ Merge did not start: {blocked}.")
        job = jobs.new_job()
        return (job.job_id, demo.render_progress(job.snapshot()), gr.Button(interactive=True),
                page.unchecked_note(text, last) or "")

    def run_merge(job_id: str, text: str, repo_name: str, private: bool, publish: bool, quants: list[str],
                  gguf_repo: bool, remix_of: dict | None, run_where: str,
                  oauth_token: gr.OAuthToken | None) -> Iterator[tuple[str, str, str, str]]:
        """Start the job when the queue gives it its turn, then stream its progress and result."""
        if job_id == BLOCKED:
            return
        job = jobs.get(job_id) or jobs.new_job()
        token = _token(settings, oauth_token)
        try:
            request = demo.job_request(settings, text, repo_name, private=private,
                                       publish=publish or run_where == where.JOBS, quants=quants or (),
                                       token=token, job_id=job.job_id,
                                       expires_at=oauth_token.expires_at if oauth_token else None,
                                       gguf_repo=bool(gguf_repo))
            backend = where.backend(run_where, token=token)
        except MergerError as e:
            job.cancel()
            yield "", "", page.error(e), ""
            return
        request = remix.apply_remix(request, remix_of, text)
        job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep,
                  cache_dir=request.cache_dir, backend=backend)
        # ZeroGPU: the merge step must run in this event's thread, inside its GPU window (see merger.compute)
        for snap in demo.follow(job, serve=getattr(backend, "serve", None)):
            card = demo.card_markdown(snap.outcome.card) if snap.outcome else ""
            yield demo.render_progress(snap), demo.render_log(snap), demo.render_outcome(snap), card

    def chat_target(job_id: str) -> str:
        run = jobs.get(job_id)
        return demo.chat_source(run.snapshot() if run else None, allow_local=allow_local) or gr.skip()

    def chat_send(source: str, history: list[dict], message: str, request: gr.Request,
                  profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        """Stream the model's reply into the conversation; errors are one line under it."""
        history = list(history or [])
        asked = history + [{"role": "user", "content": message}]
        try:
            if not allow_local and not re.fullmatch(r"[\w.-]+/[\w.-]+", source.strip()):
                raise MergerError("name a Hub repository with a GGUF file (owner/name)")
            path = resolve_gguf(source.strip(), token=_token(settings, oauth_token))
            who = _username(profile) or request.session_hash or "local"
            first = True
            for text in chats.reply(who, path, history, message):
                yield (asked + [{"role": "assistant", "content": text}], "" if first else gr.skip(),
                       "✍ writing the reply...")
                first = False
            yield gr.skip(), gr.skip(), ""
        except MergerError as e:
            yield history, message, page.error(e)

    def cancel(job_id: str) -> str:
        return page.alert("Cancelling: the job stops at its next step and removes what it wrote."
                          if jobs.cancel(job_id) else "No job is running.", "note")

    if allow_local:  # result files are offered as download links, served from the outputs folder
        settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        gr.set_static_paths([settings.outputs_dir])
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        job_id = gr.State("")
        remix_of = gr.State(None)  # {"source": repo, "models": [...], "text": recipe} after a remix
        last_check = gr.State(None)  # page.checked(): the exact text of the last Check and its report
        with gr.Row():
            gr.Markdown(f"# {TITLE}\n" + (
                "Sign in to use your own Hugging Face account for downloads and publishing. To publish into "
                "an organisation, tick it on the consent screen when you sign in."
                if settings.space else
                "**Local mode**: works offline with the demo models; results go to `outputs/`. "
                "Publishing uses the token in `HF_TOKEN`."))
            if settings.space:
                gr.LoginButton(scale=0, min_width=220)
        with gr.Row():
            with gr.Column(scale=2):
                models_box = gr.Textbox(label="Models (Hub repo IDs or huggingface.co links, one per line, "
                                        "@revision allowed)", value="\n".join(start_models), lines=4,
                                        elem_id="models-box")
                model_search = gr.Textbox(label="Add a model: type to search the Hub", elem_id="model-search",
                                          placeholder="e.g. llama, qwen, mistral")
                model_suggest = gr.Radio(label="Matching models (pick one to add it)", choices=[], visible=False,
                                         elem_id="model-suggest")
                if allow_local:
                    demo_button = gr.Button("Use the demo models", size="sm", elem_id="use-demo")
                method = gr.Dropdown(label="Method (writes a starting recipe)", value="slerp",
                                     choices=[(f"{m.pretty_name} ({name})", name) for name, m in METHODS.items()],
                                     elem_id="method")
                with gr.Row():
                    hub_repo = gr.Textbox(label="Load the recipe of a merged model on the Hub (Enter loads)",
                                          scale=3, placeholder="org/model or its huggingface.co link",
                                          elem_id="hub-repo")
                    hub_load = gr.Button("Load", scale=1, size="sm", elem_id="hub-load")
                hub_suggest = gr.Radio(label="Matching models (pick one to load its recipe)", choices=[],
                                       visible=False, elem_id="hub-suggest")
                hub_status = gr.Markdown(elem_id="hub-status")
            with gr.Column(scale=3):
                editor = gr.Code(value=start_text, language="yaml", label="Recipe (mergekit YAML)",
                                 lines=18, interactive=True, elem_id="editor", buttons=["copy"])
                gr.Markdown(page.EDITOR_KEYS_NOTE, elem_id="editor-keys")
                status = gr.Markdown(_status(start_text), elem_id="recipe-status")
        gallery_pick = gr.Radio(label="Recipe gallery (pick one to put it in the editor with your models)",
                                choices=[(e.title, e.key) for e in gallery], elem_id="gallery")
        with gr.Accordion("What each gallery recipe is for", open=False, elem_id="gallery-help"):
            gr.Markdown("\n".join(f"- **{e.title}**: {e.when}" for e in gallery))
        with gr.Row():
            repo_name = gr.Textbox(label="Output repo name", value=demo.default_repo_name(start_text),
                                   elem_id="repo-name", scale=3)
            private = gr.Checkbox(label="Private", value=True, scale=1)
            publish = gr.Checkbox(label="Publish to the Hub", value=settings.space, scale=1, elem_id="publish")
            gguf_repo = gr.Checkbox(label="GGUF files in a separate OWNER/NAME-GGUF repo", value=False, scale=2,
                                    elem_id="gguf-repo")
        repo_note = gr.Markdown(elem_id="repo-note")
        quants = gr.CheckboxGroup(label="GGUF files (llama.cpp)", choices=demo.gguf_choices(),
                                  value=list(demo.DEFAULT_QUANTS), elem_id="quants")
        run_where = gr.Radio(label="Where to merge", choices=where.choices(), value=where.HERE, elem_id="where",
                             info="Hugging Face Jobs run on your own account's hardware (pay per minute) and push "
                                  "the result themselves; Check shows the hardware, time and cost first. They need "
                                  "the 'jobs' permission, asked for at sign-in.")
        with gr.Row():
            check_button = gr.Button("Check", elem_id="check")
            merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
            cancel_button = gr.Button("Cancel", variant="secondary", interactive=False, elem_id="cancel")
        run_note = gr.Markdown(elem_id="run-note")
        report = gr.Markdown(elem_id="report")
        progress = gr.HTML(elem_id="progress")
        log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="log")
        result = gr.Markdown(elem_id="result")
        with gr.Accordion("Model card (README.md of the output)", open=False):
            card = gr.Markdown(elem_id="card")
        with gr.Accordion("Chat with the result (its GGUF in llama.cpp)", open=False, elem_id="chat"):
            chat_source = gr.Textbox(label="GGUF to chat with: a Hub repo (owner/name)" + (
                                     " or a local .gguf file" if allow_local else ""), elem_id="chat-source",
                                     placeholder="filled in after a merge with GGUF files")
            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=320)
            with gr.Row():
                chat_box = gr.Textbox(label="Message", scale=4, elem_id="chat-box", submit_btn=True)
            chat_status = gr.Markdown(elem_id="chat-status")

        evaluate_panel.build(evaluations or Evaluations(), lambda t: _token(settings, t))

        recipe_outputs = [editor, models_box, method, repo_name, status]
        method.input(from_method, [models_box, method], recipe_outputs + [gallery_pick], queue=False)
        models_box.blur(from_models, [models_box, editor, method], recipe_outputs, queue=False)
        if allow_local:
            demo_button.click(use_demo, [method], recipe_outputs + [gallery_pick], queue=False)
        gallery_pick.input(from_gallery, [gallery_pick, models_box], recipe_outputs + [gallery_pick], queue=False)
        hub_outputs = recipe_outputs + [hub_status, hub_repo]
        for trigger in (hub_load.click, hub_repo.submit):
            trigger(from_hub, [hub_repo], hub_outputs, concurrency_id="check", concurrency_limit=4,
                    show_progress_on=[hub_status])
        suggest_args = {"trigger_mode": "always_last", "concurrency_id": "suggest", "concurrency_limit": 8,
                        "show_progress": "hidden"}
        hub_repo.input(suggest, [hub_repo], [hub_suggest], **suggest_args)
        hub_suggest.input(lambda picked: (picked, gr.Radio(visible=False)), [hub_suggest], [hub_repo, hub_suggest],
                          queue=False).then(from_hub, [hub_repo], hub_outputs, concurrency_id="check",
                                            concurrency_limit=4, show_progress_on=[hub_status])
        model_search.input(suggest, [model_search], [model_suggest], **suggest_args)
        model_suggest.input(add_model, [model_suggest, models_box], [models_box, model_search, model_suggest],
                            queue=False).then(from_models, [models_box, editor, method], recipe_outputs, queue=False)
        editor.input(on_edit, [editor], [models_box, method, status], queue=False, trigger_mode="always_last")
        editor.change(page.report_for, [editor, last_check], [report], queue=False, trigger_mode="always_last")
        note_inputs = [repo_name, editor, publish, gguf_repo, quants]
        for trigger in (repo_name.change, publish.change, gguf_repo.change, quants.change):
            trigger(lambda name, text, pub, sep, q: page.repo_note(name, text, publish=pub, gguf_repo=sep, quants=q),
                    note_inputs, [repo_note], queue=False)
        check_button.click(check, [editor, quants, run_where], [report, status, last_check], concurrency_id="check",
                           concurrency_limit=4, api_name="check")
        merge_button.click(register, [editor, last_check], [job_id, progress, cancel_button, run_note],
                           queue=False).then(
            run_merge, [job_id, editor, repo_name, private, publish, quants, gguf_repo, remix_of, run_where],
            [progress, log, result, card], concurrency_id="merge", concurrency_limit=1, api_name="merge").then(
            lambda j: (gr.Button(interactive=False), gr.skip() if j == BLOCKED else ""), [job_id],
            [cancel_button, run_note], queue=False)  # the reason a Merge did not start stays on the page
        cancel_button.click(cancel, [job_id], [run_note], queue=False)
        result.change(chat_target, [job_id], [chat_source], queue=False)
        chat_box.submit(chat_send, [chat_source, chatbot, chat_box], [chatbot, chat_box, chat_status],
                        concurrency_id="chat", concurrency_limit=2)
        quantize_panel.build(settings, jobs, lambda t: _token(settings, t), _username, suggest)
        app.load(None, None, None, js=page.EDITOR_KEYS_JS)
        _community_panel(settings, app, recipe_update, recipe_outputs, editor, gallery_pick, remix_of)
    return app


RECIPE_BROWSER = browser.RecipeBrowser()  # one cache for every visitor (keyed by query and token)
SUGGESTER = hubsearch.Suggester()  # Hub model suggestions, cached per query and token
BLOCKED = "blocked"  # the job id register() gives a Merge click that must not start


def _community_panel(settings: Settings, app: gr.Blocks, recipe_update, recipe_outputs: list,  # noqa: ANN001
                     editor: gr.Code, gallery_pick: gr.Radio, remix_of: gr.State) -> None:
    """Browse merged models on the Hub, remix one, see its family tree, share or publish a recipe."""
    dataset = share.recipes_dataset()
    gallery_items = [(e.title, e.key) for e in load_gallery()]

    def search(text: str, base: str, arch: str, size: str, method: str, sort: str,
               oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        query = browser.RecipeQuery(text or "", base or "", arch or "", size, method or "", sort)
        try:
            rows = RECIPE_BROWSER.search(query, token=_token(settings, oauth_token))
        except MergerError as e:
            return gr.skip(), gr.skip(), page.error(e)
        found = f"{len(rows)} merged model(s) with a recipe." if rows else "No merged model matches these filters."
        return [r.cells() for r in rows], [r.repo for r in rows], found

    def pick(repos: list[str], evt: gr.SelectData) -> str:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return repos[row] if repos and 0 <= row < len(repos) else gr.skip()

    def load_remix(repo: str, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        try:
            made = remix.remix(repo or "", token=_token(settings, oauth_token), username=_username(profile))
        except MergerError as e:
            return (gr.skip(),) * 6 + (page.error(e),)
        text, models, method_value, _, status = recipe_update(made.text, profile)
        return text, models, method_value, made.repo_name, f"{status}\n\n{made.status()}", made.state(), made.status()

    def family(repo: str, oauth_token: gr.OAuthToken | None) -> str:
        from merger.lineage import family_tree

        try:
            ref = (repo or "").strip()
            if not ref:
                raise MergerError("pick a model in the results (or type org/name) first")
            return render_svg(family_tree([ref], token=_token(settings, oauth_token)))
        except MergerError as e:
            return page.error(e)

    def share_recipe(text: str, state: dict | None, request: gr.Request) -> tuple[str, str]:
        base = share.base_url(dict(request.headers) if request else {})
        try:
            if remix.unchanged(state, text):
                return share.model_link(base, state["source"]), "A link to the published model's recipe."
            return share.recipe_link(base, text), "The recipe itself travels in the link."
        except MergerError as e:
            return "", page.error(e)

    def share_model(repo: str, request: gr.Request) -> tuple[str, str]:
        try:
            return share.model_link(share.base_url(dict(request.headers) if request else {}), repo or ""), ""
        except MergerError as e:
            return "", page.error(e)

    def publish_recipe(text: str, title: str, description: str, oauth_token: gr.OAuthToken | None) -> str:
        try:
            done = share.publish_recipe(text, title, description, token=_token(settings, oauth_token),
                                        dataset=dataset)
        except MergerError as e:
            return page.error(e)
        return (f"Pull request opened on [{done.dataset}]({done.pr_url}): [{done.pr_url}]({done.pr_url}). "
                f"Once a maintainer merges it, `{done.path}` appears in everyone's gallery.")

    def open_link(request: gr.Request, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        params = dict(request.query_params) if request else {}
        try:
            link = share.parse_link(params)
        except MergerError as e:
            return (gr.skip(),) * 6 + (page.error(e),)
        if link is None:
            return (gr.skip(),) * 7
        if link.model:
            return load_remix(link.model, profile, oauth_token)
        return (*recipe_update(link.recipe, profile), None, "Recipe opened from a shared link.")

    def refresh_gallery(oauth_token: gr.OAuthToken | None):  # noqa: ANN202
        entries, note = safe_load_community(dataset, token=_token(settings, oauth_token))
        return gr.Radio(choices=gallery_items + [(e.title, e.key) for e in entries]), note or (
            f"{len(entries)} community recipe(s) from [{dataset}](https://huggingface.co/datasets/{dataset}).")

    with gr.Accordion("Community: browse, remix and share recipes on the Hub", open=False,
                      elem_id="community"):
        with gr.Row():
            query = gr.Textbox(label="Search model names", elem_id="browse-search", scale=2)
            base = gr.Textbox(label="Base model (org/name)", elem_id="browse-base", scale=2)
            arch = gr.Textbox(label="Architecture (model_type, e.g. llama)", elem_id="browse-arch", scale=1)
        with gr.Row():
            size = gr.Dropdown(label="Size", choices=list(browser.SIZES), value="any size", elem_id="browse-size")
            method = gr.Dropdown(label="Method", choices=[("any", "")] + [(m, m) for m in METHODS], value="",
                                 elem_id="browse-method")
            sort = gr.Radio(label="Sort by", choices=list(browser.SORTS), value="likes", elem_id="browse-sort")
            search_button = gr.Button("Search the Hub", elem_id="browse-go")
        found = gr.Markdown(elem_id="browse-status")
        results = gr.Dataframe(headers=browser.COLUMNS, interactive=False, elem_id="browse-results", wrap=True)
        repos = gr.State([])
        with gr.Row():
            chosen = gr.Textbox(label="Model (click a row, or type org/name)", elem_id="community-model", scale=3)
            remix_button = gr.Button("Remix", variant="primary", elem_id="remix", scale=1)
            tree_button = gr.Button("Family tree", elem_id="lineage-button", scale=1)
            link_button = gr.Button("Link to this model", elem_id="model-link", scale=1)
        note = gr.Markdown(elem_id="community-note")
        tree = gr.HTML(elem_id="lineage")
        gr.Markdown("**Share the recipe in the editor**: a link opens this app with it; *Publish recipe* "
                    f"proposes it to the community dataset [{dataset}](https://huggingface.co/datasets/{dataset}) "
                    "as a pull request (set `MERGER_RECIPES_DATASET` to use another).")
        with gr.Row():
            share_button = gr.Button("Share", elem_id="share")
            link = gr.Textbox(label="Link", buttons=["copy"], elem_id="share-link", scale=3)
        with gr.Row():
            title = gr.Textbox(label="Title", elem_id="recipe-title", scale=2)
            description = gr.Textbox(label="Description (when to use it)", elem_id="recipe-description", scale=3)
            publish_button = gr.Button("Publish recipe", elem_id="publish-recipe", scale=1)
        published = gr.Markdown(elem_id="publish-result")
        gallery_note = gr.Markdown(elem_id="community-gallery")

    search_button.click(search, [query, base, arch, size, method, sort], [results, repos, found],
                        concurrency_id="check", concurrency_limit=4)
    results.select(pick, [repos], [chosen], queue=False)
    remix_outputs = [*recipe_outputs, remix_of, note]
    remix_button.click(load_remix, [chosen], remix_outputs, concurrency_id="check", concurrency_limit=4)
    tree_button.click(family, [chosen], [tree], concurrency_id="check", concurrency_limit=4)
    link_button.click(share_model, [chosen], [link, note], queue=False)
    share_button.click(share_recipe, [editor, remix_of], [link, note], queue=False)
    publish_button.click(publish_recipe, [editor, title, description], [published], concurrency_id="check",
                         concurrency_limit=4)
    app.load(open_link, None, remix_outputs)
    app.load(refresh_gallery, None, [gallery_pick, gallery_note])


def main(**launch: Any) -> None:
    """Serve the app; `launch` adds or overrides gradio launch() options (the Space test serves HTTPS)."""
    where.prepare()  # ZeroGPU registers its @spaces.GPU functions at start-up
    settings = demo.settings_from_env()
    app = build_app(settings)
    app.queue(default_concurrency_limit=1)
    app.launch(**{"server_name": settings.host, "server_port": settings.port, "ssr_mode": False, "css": CSS,
                  "footer_links": ["gradio"], **launch})


if __name__ == "__main__":
    main()
