"""The app's logic without a browser (merger.app.demo, merger.app.runs, merger.app.gallery), the app served in-process
and called with gradio_client (publishing with an OAuth token, two users' jobs queued), and the Space
packaging (Dockerfile, space/README.md)."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from merger.app import demo
from merger.errors import HubError, RecipeError
from merger.app.gallery import load_gallery, recipe_from_hub, recipe_in_readme
from merger.app.runs import CANCELLED, DONE, FAILED, Run, RunQueue
from merger.pipeline import Event, check
from merger.recipe import parse_recipe
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]
HUB_A, HUB_B, HUB_C = "org/alpha-7b", "org/beta-7b@v1", "other/gamma"


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [str(p) for p in demo.ensure_demo_models(tmp_path_factory.mktemp("demo")).values()]


def local_settings(root: Path) -> demo.Settings:
    return demo.Settings(space=False, host="127.0.0.1", port=0, outputs_dir=root / "outputs",
                         demo_dir=root / "demo_models")


def space_settings(root: Path) -> demo.Settings:
    return demo.settings_from_env({"SPACE_ID": "alice/merger"}, root=root)


# ---------------------------------------------------------------- settings and demo models

def test_settings_bind_local_or_space() -> None:
    local = demo.settings_from_env({})
    assert (local.space, local.host, local.port, local.allow_local) == (False, "127.0.0.1", 7860, True)
    space = demo.settings_from_env({"SPACE_ID": "alice/merger"})
    assert (space.space, space.host, space.port, space.allow_local) == (True, "0.0.0.0", 7860, False)


def test_quiet_environment_turns_off_telemetry() -> None:
    env: dict[str, str] = {}
    demo.quiet_environment(env)
    assert env == {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_demo_models_are_deterministic_and_reused(tmp_path: Path, demo_models: list[str]) -> None:
    again = demo.ensure_demo_models(tmp_path)
    for name, path in again.items():
        first = Path(next(m for m in demo_models if m.endswith("/" + name)))
        assert (path / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    stamp = (again["base"] / "model.safetensors").stat().st_mtime_ns
    demo.ensure_demo_models(tmp_path)
    assert (again["base"] / "model.safetensors").stat().st_mtime_ns == stamp  # not regenerated


# ---------------------------------------------------------------- recipe from models + method

def test_starting_recipes_parse_for_every_method() -> None:
    from merger.methods import METHODS

    for name, method in METHODS.items():
        if name == "passthrough":
            continue
        n = method.max_models or 3
        models = [HUB_A, HUB_B, HUB_C][:max(n, method.min_models)] if n <= 3 else [HUB_A, HUB_B, HUB_C]
        if name == "nuslerp":
            models = [HUB_A, HUB_B]
        recipe = parse_recipe(demo.starting_recipe(models, name))
        assert recipe.method == name
        assert [str(r) for r in recipe.referenced_models()] == models


def test_starting_recipe_ties_values() -> None:
    data = yaml.safe_load(demo.starting_recipe([HUB_A, HUB_B, HUB_C], "ties"))
    assert data["base_model"] == HUB_A
    assert data["models"][0] == {"model": HUB_A}
    assert data["models"][1]["parameters"] == {"weight": 0.5, "density": 0.5}
    linear = yaml.safe_load(demo.starting_recipe([HUB_A, HUB_B], "linear"))
    assert [m["parameters"]["weight"] for m in linear["models"]] == [0.5, 0.5] and "base_model" not in linear


def test_starting_recipe_refuses_wrong_model_count() -> None:
    with pytest.raises(RecipeError, match="slerp merges exactly 2 models and the box has 3"):
        demo.starting_recipe([HUB_A, HUB_B, HUB_C], "slerp")
    with pytest.raises(RecipeError, match="at least one model"):
        demo.starting_recipe([], "linear")
    assert demo.models_for_method([HUB_A, HUB_B, HUB_C], "slerp") == [HUB_A, HUB_B]


def test_frankenmerge_reads_layer_counts(demo_models: list[str]) -> None:
    recipe = parse_recipe(demo.starting_recipe(demo_models[:2], "passthrough"))
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 2), (1, 4)]
    assert check(recipe).ok


def test_models_box_and_editor_stay_consistent() -> None:
    text = demo.starting_recipe([HUB_A, HUB_B], "slerp").replace("t: 0.5", "t: 0.3")
    assert demo.recipe_models(text) == [HUB_A, HUB_B] and demo.recipe_method(text) == "slerp"
    swapped = demo.sync_models_into_recipe(text, [HUB_C, HUB_A], "slerp")
    assert "t: 0.3" in swapped  # same count: parameters kept, models substituted everywhere
    assert demo.recipe_models(swapped) == [HUB_C, HUB_A] and f"base_model: {HUB_C}" in swapped
    linear = demo.starting_recipe([HUB_A, HUB_B], "linear")
    grown = demo.sync_models_into_recipe(linear, [HUB_A, HUB_B, HUB_C], "slerp")
    assert parse_recipe(grown).method == "linear"  # different count: a fresh recipe, same method
    assert demo.recipe_models(grown) == [HUB_A, HUB_B, HUB_C]
    with pytest.raises(RecipeError, match="exactly 2"):
        demo.sync_models_into_recipe(text, [HUB_A, HUB_B, HUB_C], "ties")
    broken = "models:\n  - model: a/b\n  - model: c/d\nmerge_method: [oops"
    assert demo.recipe_models(broken) == ["a/b", "c/d"]


def test_parse_model_list() -> None:
    assert demo.parse_model_list(f"{HUB_A}\n\n  {HUB_B}  # pinned\n{HUB_A}\n", allow_local=False) == [HUB_A, HUB_B]
    with pytest.raises(RecipeError, match="line 2"):
        demo.parse_model_list(f"{HUB_A}\nnot a repo id!", allow_local=False)


# ---------------------------------------------------------------- gallery

def test_gallery_has_the_examples_and_they_parse() -> None:
    entries = load_gallery()
    methods = [parse_recipe(e.text).method for e in entries]
    assert methods == ["ties", "dare_ties", "linear", "slerp", "slerp", "slerp", "passthrough", "moe", "ties"]
    assert all(e.title and 20 < len(e.when) < 160 and "\n" not in e.when for e in entries)
    by_key = {e.key: parse_recipe(e.text) for e in entries}
    assert by_key["ties-normalize.yml"].params["normalize"] is True
    assert by_key["dare-ties-int8-mask.yml"].params["int8_mask"] is True
    assert [m.params["weight"] for m in by_key["linear-70-30.yml"].models] == [0.7, 0.3]
    assert by_key["slerp-gradient.yml"].params["t"] == [0, 0.5, 0.3, 0.7, 1]
    frank = by_key["passthrough-frankenmerge.yml"]
    assert [s.sources[0].layer_range for s in frank.slices] == [(0, 24), (8, 32)]
    assert by_key["ties-union-tokenizer.yml"].tokenizer_source == "union"


def test_gallery_matches_the_shared_examples() -> None:
    shared = ROOT.parent / "shared" / "recipes"
    if not shared.is_dir():
        pytest.skip("shared/ is not beside the repository")
    pairs = {"ties-normalize.yml": "phi2-ties.yml", "dare-ties-int8-mask.yml": "medical-dare-ties.yml",
             "linear-70-30.yml": "medical-linear.yml", "slerp.yml": "chat-slerp.yml",
             "slerp-q-proj-only.yml": "slerp-q-proj-only.yml", "slerp-gradient.yml": "slerp-gradient.yml"}
    entries = {e.key: e.text for e in load_gallery()}
    for ours, theirs in pairs.items():
        assert entries[ours] == (shared / theirs).read_text()


def test_gallery_recipe_takes_the_users_models(demo_models: list[str]) -> None:
    slerp = next(e for e in load_gallery() if e.key == "slerp-q-proj-only.yml")
    text = demo.gallery_recipe(slerp.text, demo_models[:2])
    recipe = parse_recipe(text)
    assert [r.repo for r in recipe.referenced_models()] == demo_models[:2]
    assert "filter: q_proj" in text and check(recipe).ok
    assert demo.gallery_recipe(slerp.text, demo_models[:1]) == slerp.text  # too few models: unchanged


def test_recipe_from_hub_config_then_readme(hub: HubServer) -> None:
    recipe = next(e for e in load_gallery() if e.key == "slerp.yml").text
    hub.create_repo("acme/with-config")
    hub.commit_files("acme/with-config", {"mergekit_config.yml": recipe.encode()})
    assert recipe_from_hub("acme/with-config") == recipe
    readme = f"---\nlicense: mit\n---\n# A merge\n\n```yaml\nfoo: 1\n```\n\n```yaml\n{recipe}```\n"
    hub.create_repo("acme/with-readme")
    hub.commit_files("acme/with-readme", {"README.md": readme.encode()})
    assert recipe_from_hub("acme/with-readme") == recipe
    assert recipe_in_readme("```yaml\nfoo: 1\n```") is None
    hub.create_repo("acme/plain")
    with pytest.raises(HubError, match="neither mergekit_config.yml nor a YAML recipe"):
        recipe_from_hub("acme/plain")
    with pytest.raises(HubError, match="was not found"):
        recipe_from_hub("acme/missing")


# ---------------------------------------------------------------- names, options, rendering

def test_default_repo_name() -> None:
    text = next(e for e in load_gallery() if e.key == "slerp.yml").text
    assert demo.default_repo_name(text) == "Llama-2-7b-chat-hf-meditron-7b-slerp"
    assert demo.default_repo_name(text, "alice") == "alice/Llama-2-7b-chat-hf-meditron-7b-slerp"
    dare = next(e for e in load_gallery() if e.key == "dare-ties-int8-mask.yml").text
    name = demo.default_repo_name(dare, "alice")
    assert name == "alice/Llama-2-7b-hf-Llama-2-7b-chat-hf-meditron-7b-dare-ties"
    from merger.hub import validate_repo_id

    validate_repo_id(name)
    long = demo.starting_recipe(["o/" + "x" * 90, "o/" + "y" * 90], "linear")
    validate_repo_id(demo.default_repo_name(long, "alice"))


def test_gguf_choices_explain_size() -> None:
    choices = dict((v, label) for label, v in demo.gguf_choices())
    assert demo.DEFAULT_QUANTS == ("Q4_K_M",)
    assert choices["Q4_K_M"].startswith("Q4_K_M: ~30% of F16 size")  # 4.85 / 16 bits per weight
    assert choices["Q8_0"].startswith("Q8_0: ~53% of F16 size")  # 8.5 / 16


def test_check_rendering(demo_models: list[str]) -> None:
    good = check(parse_recipe(demo.starting_recipe(demo_models[:2], "slerp")))
    md = demo.render_check(good)
    assert md.startswith("### Check: ✓ **OK**") and "No problems found." in md
    assert md.count("| LlamaForCausalLM |") == 2
    bad_text = demo.starting_recipe(demo_models[:2], "slerp").replace("merge_method: slerp", "merge_method: nearswap")
    bad_text = bad_text.replace("t: 0.5", "t: 0.001")
    tiny = Path(demo_models[0]).parent
    other = str(tiny.parent / "qwen")
    from merger.app.tiny import make_tiny_model

    make_tiny_model(other, "qwen2", seed=3)
    report = check(parse_recipe(bad_text.replace(demo_models[1], other)))
    md = demo.render_check(report)
    assert "✗ **Not mergeable**" in md
    first_error = next(p for p in report.problems if p.severity == "error")
    assert f"- ✗ **error**: {first_error.message[:30]}" in md


def test_recipe_status_and_errors() -> None:
    assert demo.recipe_status("merge_method: slerpp", allow_local=True).startswith("✗ ")
    assert "slerp" in demo.recipe_status("merge_method: slerpp", allow_local=True)
    assert demo.render_error(ValueError("secret internals")) == \
        "✗ internal error (ValueError); please report it with your recipe"


def test_progress_and_log_rendering() -> None:
    job = Run("abc")
    job.status = "running"
    job._on_event(Event("download", 0.25, "org/alpha-7b", 250_000_000, 1_000_000_000))
    job._stage_started -= 10  # 10 s in, a quarter of the bytes: 30 s left
    snap = job.snapshot()
    assert snap.eta_seconds == pytest.approx(30, abs=0.5)
    html = demo.render_progress(snap)
    assert "Step 2/7: download, 25%" in html and "250.0 MB / 1.0 GB" in html and "about 30s left" in html
    assert 'data-fraction="0.250"' in html
    job._on_event(Event("download", 0.5, "org/alpha-7b", 500_000_000, 1_000_000_000))
    job._on_event(Event("merge", 0.1, "model.embed_tokens.weight"))
    log = demo.render_log(job.snapshot()).splitlines()
    assert [line.split("  ", 1)[1] for line in log] == ["download: org/alpha-7b", "merge: model.embed_tokens.weight"]
    assert demo.human_seconds(3725) == "1h 02m" and demo.human_bytes(1234) == "1.2 kB"


# ---------------------------------------------------------------- jobs: requests, cancel, cleanup

def test_space_mode_refuses_local_paths(tmp_path: Path, demo_models: list[str]) -> None:
    text = demo.starting_recipe(demo_models[:2], "slerp")
    with pytest.raises(RecipeError, match="local paths are not allowed"):
        demo.job_request(space_settings(tmp_path), text, "alice/x", private=True, publish=True, quants=(),
                         token="hf_alice_write", job_id="j1")
    assert demo.recipe_status(text, allow_local=False).startswith("✗ ")
    with pytest.raises(RecipeError, match="local"):
        demo.parse_model_list(demo_models[0], allow_local=False)
    hub_text = demo.starting_recipe([HUB_A, HUB_B], "slerp")
    with pytest.raises(HubError, match="sign in"):
        demo.job_request(space_settings(tmp_path), hub_text, "alice/x", private=True, publish=True, quants=(),
                         token=None, job_id="j1")
    assert demo.resolve_token(space_settings(tmp_path), None, {"HF_TOKEN": "hf_owner"}) is None
    assert demo.resolve_token(local_settings(tmp_path), None, {"HF_TOKEN": "hf_mine"}) == "hf_mine"


def test_space_job_runs_in_its_own_temp_folder(tmp_path: Path, hub: HubServer) -> None:
    hub_text = demo.starting_recipe([HUB_A, HUB_B], "slerp")
    request = demo.job_request(space_settings(tmp_path), hub_text, "alice/x", private=True, publish=True,
                               quants=("Q4_K_M",), token="hf_alice_write", job_id="j1")
    try:
        assert request.options.allow_local is False and request.keep is False
        assert request.options.out_dir.parent == request.job_dir and "merge-j1-" in request.job_dir.name
        assert not request.job_dir.is_relative_to(tmp_path)
        assert (request.options.push, request.options.gguf) == ("alice/x", ("Q4_K_M",))
    finally:
        request.job_dir.rmdir()


def _local_job(tmp_path: Path, models: list[str], hook=None, method: str = "slerp"):  # noqa: ANN001, ANN202
    manager = RunQueue(hook=hook)
    job = manager.new_job()
    text = demo.starting_recipe(models, method)
    request = demo.job_request(local_settings(tmp_path), text, "", private=False, publish=False, quants=(),
                               token=None, job_id=job.job_id)
    return manager, job, request


def test_local_job_writes_outputs_folder(tmp_path: Path, demo_models: list[str]) -> None:
    manager, job, request = _local_job(tmp_path, demo_models[:2])
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep)
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.status == DONE, snap.error
    out = tmp_path / "outputs" / job.job_id / "base-chat-slerp"
    assert snap.outcome.out_dir == out
    assert dict(snap.outcome.files)["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert snap.outcome.card.startswith("---\n") and "# base-chat-slerp" in snap.outcome.card
    assert demo.card_markdown(snap.outcome.card).startswith("```yaml\nlibrary_name: transformers")
    assert "| [model.safetensors](gradio_api/file=" in demo.render_outcome(snap)  # a download link


def test_cancel_mid_merge_stops_and_cleans_up(tmp_path: Path, demo_models: list[str]) -> None:
    reached = threading.Event()
    seen: list[str] = []

    def hold(job: Run, event: Event) -> None:
        seen.append(event.stage)
        if event.stage == "merge":
            reached.set()
            job.cancel_event.wait(30)

    manager, job, request = _local_job(tmp_path, demo_models[:2], hook=hold)
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep)
    assert reached.wait(30)
    assert request.job_dir.exists() and job.snapshot().status == "running"
    assert manager.cancel(job.job_id)
    assert job.wait(30)
    snap = job.snapshot()
    assert snap.status == CANCELLED and "removed" in snap.message
    assert seen.count("merge") == 1  # stopped at the next tensor, not after the whole merge
    assert not request.job_dir.exists() and not any((tmp_path / "outputs").iterdir())
    assert demo.render_outcome(snap) == "Cancelled: nothing was kept."
    assert not manager.cancel(job.job_id)  # finished jobs cannot be cancelled


def test_cancel_before_start(tmp_path: Path, demo_models: list[str]) -> None:
    manager, job, request = _local_job(tmp_path, demo_models[:2])
    request.job_dir.mkdir(parents=True)
    job.cancel()
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep)
    assert job.finished and job.snapshot().status == CANCELLED and not request.job_dir.exists()


def test_failed_job_reports_one_line(tmp_path: Path, demo_models: list[str]) -> None:
    manager, job, request = _local_job(tmp_path, demo_models[:2])
    request.job_dir.mkdir(parents=True)
    request.options.out_dir.mkdir()
    (request.options.out_dir / "keep.txt").write_text("not ours")
    job.start(request.recipe, request.options, job_dir=request.job_dir, keep=request.keep)
    assert job.wait(30)
    snap = job.snapshot()
    assert snap.status == FAILED and "already exists" in snap.error and "\n" not in snap.error
    assert 'class="msg msg-error" role="alert"' in demo.render_outcome(snap)
    assert snap.error not in demo.render_progress(snap)  # the reason is shown once, in the result


# ---------------------------------------------------------------- the app, served, through gradio_client

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """Run hook: when each job started and stopped merging; paces merges so two users' jobs overlap in time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[float]] = {}

    def __call__(self, job: Run, event: Event) -> None:
        now = time.monotonic()
        with self.lock:
            self.spans.setdefault(job.job_id, [now, now])[1] = now
        if event.stage == "merge":
            time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path, demo_models: list[str], hub: HubServer):  # noqa: ANN201
    import app as app_module

    settings = local_settings(tmp_path)
    settings = demo.Settings(False, "127.0.0.1", _free_port(), settings.outputs_dir, Path(demo_models[0]).parent)
    recorder = Recorder()
    blocks = app_module.build_app(settings, RunQueue(hook=recorder))
    blocks.queue()
    blocks.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                  ssr_mode=False)
    try:
        yield f"http://127.0.0.1:{settings.port}", settings, recorder
    finally:
        blocks.close()


def test_client_check_and_publish_with_oauth_token(served, demo_models: list[str], hub: HubServer) -> None:  # noqa: ANN001
    from gradio_client import Client

    url, settings, _ = served
    text = demo.starting_recipe(demo_models[:2], "slerp")
    client = Client(url, verbose=False, oauth_token="hf_alice_write")
    report, status = client.predict(text, [], api_name="/check")
    assert report.startswith("### Check: ✓ **OK**") and "✓ valid recipe" in status
    progress, log, result, card = client.predict(text, "demo-merge", False, True, [], api_name="/merge")
    assert 'data-status="done"' in progress, result
    assert f"{hub.url}/alice/demo-merge" in result  # the bare name went under the token's account
    assert "pushed" in log and "hf_alice_write" not in log + result + card
    assert set(hub.repo_files("alice/demo-merge")) >= {"README.md", "mergekit_config.yml", "model.safetensors"}
    assert 'model_id = "alice/demo-merge"' in hub.file_bytes("alice/demo-merge", "README.md").decode()
    signed_out = Client(url, verbose=False)
    _, _, result, _ = signed_out.predict(text, "demo-merge", False, True, [], api_name="/merge")
    assert "✗ publishing needs you to sign in" in result and 'role="alert"' in result


def test_two_users_jobs_queue_without_mixing(served, demo_models: list[str]) -> None:  # noqa: ANN001
    from gradio_client import Client

    url, settings, recorder = served
    texts = {"one": demo.starting_recipe(demo_models[:2], "slerp"),
             "two": demo.starting_recipe(demo_models[1:], "linear")}
    submitted = time.monotonic()
    jobs = {who: Client(url, verbose=False).submit(text, f"user-{who}", False, False, [], api_name="/merge")
            for who, text in texts.items()}
    ranks = set()
    while not all(job.done() for job in jobs.values()):
        ranks |= {(s.code.name, s.rank) for s in (job.status() for job in jobs.values()) if s.code.name == "IN_QUEUE"}
        time.sleep(0.05)
    outputs = {who: job.result(timeout=120) for who, job in jobs.items()}
    first, second = sorted(recorder.spans.values())
    assert second[0] >= first[1]  # merge jobs run one at a time: the second starts after the first ends
    assert second[0] - submitted > 0.5  # ... so it waited (the first merges ~40 tensors at 20 ms each)
    assert ("IN_QUEUE", 0) in ranks  # and the waiting user was told its place in the queue
    folders = {}
    for who, (progress, log, result, card) in outputs.items():
        assert 'data-status="done"' in progress, result
        folder = re.search(r"Files in `([^`]+)`", result).group(1)
        folders[who] = Path(folder)
        assert Path(folder).name == f"user-{who}"
        assert (Path(folder) / "mergekit_config.yml").read_text() == texts[who]
        assert log.count("done in") == 1 and f"# user-{who}" in card
    assert folders["one"].parent != folders["two"].parent


# ---------------------------------------------------------------- Space packaging

def test_space_card_front_matter() -> None:
    text = (ROOT / "space" / "README.md").read_text()
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL).group(1))
    assert front["sdk"] == "docker" and front["app_port"] == 7860 and front["hf_oauth"] is True
    assert set(front["hf_oauth_scopes"]) == {"read-repos", "gated-repos", "write-repos", "manage-repos", "jobs"}
    assert front["suggested_hardware"] in {"t4-small", "t4-medium", "l4x1", "a10g-small"}
    assert "README.md" in text.split("---", 2)[2] and "deploy" in text.lower()
