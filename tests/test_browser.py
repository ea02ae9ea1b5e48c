"""The app in a real browser: Debian's headless Chromium driven by Playwright, against the app served in-process.

One page walks the whole local flow (demo models, gallery, check, merge with GGUF, a broken recipe,
cancel, publish to the local Hub server). Screenshots land in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from merger.app import demo
from merger.app.runs import Run, RunQueue
from merger.pipeline import Event
from tests.hubserver import HubServer, use_hub

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 60_000


class Pacer:
    """The app's job hook: slows merge steps a little (so progress is visible) or holds them (for Cancel)."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.hold = threading.Event()
        self.holding = threading.Event()

    def __call__(self, job: Run, event: Event) -> None:
        if event.stage != "merge":
            return
        time.sleep(self.delay)
        if self.hold.is_set():
            self.holding.set()
            while self.hold.is_set() and not job.cancel_event.is_set():
                time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The local Hub; HF_TOKEN plays the user's token, as in local mode (there is no OAuth off a Space)."""
    with HubServer() as server, pytest.MonkeyPatch.context() as mp:
        use_hub(server, mp, tmp_path_factory.mktemp("hf_home"))
        mp.setenv("HF_TOKEN", "hf_alice_write")
        yield server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, hub_server: HubServer) -> Iterator[tuple[str, demo.Settings, Pacer]]:
    import app as app_module

    root = tmp_path_factory.mktemp("approot")
    settings = demo.Settings(space=False, host="127.0.0.1", port=_free_port(), outputs_dir=root / "outputs",
                             demo_dir=root / "demo_models")
    pacer = Pacer()
    blocks = app_module.build_app(settings, RunQueue(hook=pacer))
    blocks.queue()
    blocks.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True, quiet=True,
                  ssr_mode=False, css=app_module.CSS)
    try:
        yield f"http://{settings.host}:{settings.port}", settings, pacer
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def page(served: tuple[str, demo.Settings, Pacer], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
                    "the browser tests need it and never download a browser")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1400})
        p = context.new_page()
        p.set_default_timeout(TIMEOUT_MS)
        p.goto(served[0])
        p.locator("#editor .cm-content").wait_for()
        yield p
        context.close()


def _editor_text(page) -> str:  # noqa: ANN001 - playwright Page
    return page.locator("#editor .cm-content").inner_text()


def _set_quants(page, wanted: set[str]) -> None:  # noqa: ANN001
    for value, _ in [(v, label) for label, v in demo.gguf_choices()]:
        box = page.locator("#quants label", has_text=f"{value}:").locator("input")
        if box.is_checked() != (value in wanted):
            box.click()


def _wait_status(page, status: str) -> None:  # noqa: ANN001
    page.locator(f'#progress .merge-progress[data-status="{status}"]').wait_for()


def test_demo_models_gallery_check_merge(page, served) -> None:  # noqa: ANN001
    url, settings, pacer = served
    demo_models = [str(settings.demo_dir / name) for name in demo.DEMO_MODELS]
    page.click("#use-demo")
    page.locator("#gallery label", has_text="SLERP, t = 0.5").click()
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('merge_method: slerp')")
    text = _editor_text(page)
    assert demo_models[0] in text and demo_models[1] in text and "value: 0.5" in text
    assert page.locator("#models-box textarea").input_value().splitlines() == demo_models[:2]

    started = time.monotonic()
    page.click("#check")
    page.locator("#report", has_text="OK").wait_for()
    assert time.monotonic() - started < 10
    assert "Not mergeable" not in page.locator("#report").inner_text()
    page.screenshot(path=str(ARTIFACTS / "check.png"), full_page=True)

    _set_quants(page, {"Q8_0"})
    pacer.delay = 0.03  # ~40 tensors: the merge stage lasts about a second, long enough to be seen
    page.click("#merge")
    fractions, stages = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bar = page.evaluate("() => { const b = document.querySelector('#progress .merge-progress');"  # one read:
                            " return b && [b.dataset.status, b.dataset.stage, b.dataset.fraction]; }")  # no mixed panels
        if bar:
            status, stage, fraction = bar
            if status == "running" and stage == "merge":
                fractions.append(float(fraction))
            stages.append(stage)
            if status in ("done", "failed", "cancelled"):
                break
        time.sleep(0.05)
    pacer.delay = 0.0
    assert stages[-1] == "done", page.locator("#result").inner_text()
    assert len(set(fractions)) >= 2 and fractions == sorted(fractions), fractions
    result = page.locator("#result").inner_text()
    for name in ("model.safetensors", "config.json", "mergekit_config.yml", "README.md", "Q8_0.gguf",
                 "✓ pass", "vs safetensors model"):
        assert name in result
    assert "Q4_K_M" not in result
    assert "merge:" in page.locator("#log textarea").input_value()
    page.screenshot(path=str(ARTIFACTS / "merged.png"), full_page=True)
    assert [p.name for p in settings.outputs_dir.rglob("*.gguf")] == ["base-chat-slerp-Q8_0.gguf"]


def test_broken_recipe_shows_error_beside_editor(page) -> None:  # noqa: ANN001
    saved = _editor_text(page)
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.type("merge_method: slerpp")
    status = page.locator("#recipe-status")
    status.filter(has_text="slerpp").wait_for()
    assert "✗" in status.inner_text() and "slerpp" in status.inner_text()
    page.screenshot(path=str(ARTIFACTS / "broken-recipe.png"), full_page=True)
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.locator("#gallery label", has_text="SLERP gradient").click()  # a valid recipe again
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('merge_method: slerp')")
    assert saved.splitlines()[1] in _editor_text(page)  # the same demo models were put in
    page.locator("#recipe-status", has_text="valid recipe").wait_for()


def test_cancel_mid_job_leaves_no_files(page, served) -> None:  # noqa: ANN001
    url, settings, pacer = served
    before = sorted(settings.outputs_dir.iterdir())
    pacer.holding.clear()
    pacer.hold.set()
    try:
        page.click("#merge")
        assert pacer.holding.wait(30), "the job never reached the merge stage"
        page.locator('#progress .merge-progress[data-stage="merge"]').wait_for()
        page.click("#cancel")
        _wait_status(page, "cancelled")
    finally:
        pacer.hold.clear()
    assert "nothing was kept" in page.locator("#result").inner_text()
    assert sorted(settings.outputs_dir.iterdir()) == before
    assert not list(settings.outputs_dir.parent.rglob("*.partial*"))
    page.screenshot(path=str(ARTIFACTS / "cancelled.png"), full_page=True)


def test_publish_to_local_hub(page, served, hub_server: HubServer) -> None:  # noqa: ANN001
    page.locator("#publish input").check()
    page.locator("#repo-name textarea, #repo-name input").first.fill("alice/demo-slerp")
    _set_quants(page, set())
    page.click("#merge")
    _wait_status(page, "done")
    result = page.locator("#result").inner_text()
    assert f"{hub_server.url}/alice/demo-slerp" in result
    files = hub_server.repo_files("alice/demo-slerp")
    assert {"README.md", "mergekit_config.yml", "model.safetensors", "config.json"} <= set(files)
    card = hub_server.file_bytes("alice/demo-slerp", "README.md").decode()
    assert "# demo-slerp" in card and "merge_method: slerp" in card and "- llm-merger" in card
    page.locator("#publish input").uncheck()
    shutil.rmtree(served[1].outputs_dir, ignore_errors=True)


def test_chat_with_a_merged_gguf(page, served, tmp_path: Path) -> None:  # noqa: ANN001
    """The chat panel: a GGUF file, a message, a streamed reply from llama.cpp under it."""
    from quantize.llama import export_gguf

    settings = served[1]
    model = next(p for p in sorted(settings.demo_dir.iterdir()) if (p / "config.json").is_file())
    gguf_path = export_gguf(model, tmp_path, "chat", None, ["Q8_0"])[0]
    page.locator("#chat").get_by_text("Chat with the result").click()
    page.locator("#chat-source textarea").fill(str(gguf_path))
    page.locator("#chat-box textarea").fill("Hello there")
    page.locator("#chat-box textarea").press("Enter")
    page.wait_for_function("() => { const b = document.querySelector('#chatbot');"
                           " return b && b.innerText.includes('Hello there') && b.querySelectorAll('.bot, "
                           "[data-testid=bot]').length > 0; }")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.trim() === ''")
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    page.locator("#chat-source textarea").fill(str(tmp_path / "missing.gguf"))
    page.locator("#chat-box textarea").fill("again")
    page.locator("#chat-box textarea").press("Enter")
    try:
        page.locator("#chat-status", has_text="no such GGUF file").wait_for()
    finally:
        page.screenshot(path=str(ARTIFACTS / "chat-error.png"), full_page=True)


def test_run_on_hugging_face_jobs(page, hub_server: HubServer, tiny: dict[str, Path],  # noqa: ANN001
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """"Run on Hugging Face Jobs": Check shows the flavor and cost, Merge runs a job (a local subprocess of
    the test Hub) that pushes the result, and the progress panel links the job's page."""
    monkeypatch.setenv("MERGER_JOB_IMAGE", "hf.co/spaces/alice/llm-merger")
    for name in ("base", "chat"):
        if f"alice/{name}" not in hub_server.repos:
            hub_server.upload_folder(tiny[name], f"alice/{name}")
    page.locator("#models-box textarea").fill("alice/base\nalice/chat")
    page.locator("#method").click()  # leaving the box puts the models into the recipe
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('alice/chat')")
    page.keyboard.press("Escape")
    page.locator("#where label", has_text="Run on Hugging Face Jobs").click()
    page.locator("#repo-name textarea, #repo-name input").first.fill("alice/job-slerp")
    _set_quants(page, set())
    page.click("#check")
    page.locator("#report", has_text="Hugging Face Jobs flavor: cpu-basic").wait_for()
    page.click("#merge")
    _wait_status(page, "done")
    job_id = list(hub_server.jobs.jobs)[-1]
    assert page.locator(f'#progress a[href="{hub_server.url}/jobs/alice/{job_id}"]').count() == 1
    assert f"{hub_server.url}/alice/job-slerp" in page.locator("#result").inner_text()
    assert {"model.safetensors", "README.md"} <= set(hub_server.repo_files("alice/job-slerp"))
    page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
    page.locator("#where label", has_text="Run here").click()
