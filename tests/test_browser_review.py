"""Issue 15 as an independent reviewer met it: dark mode contrast, the MoE gallery example end to end, the
separate OWNER/NAME-GGUF repo published from a merge, and the "Quantize a model" errors, in Debian's headless
Chromium against the app served in-process and the local Hub server. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import pytest

from tests.sharing_fixtures import publish_model
from tests.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _editor_text, _set_quants, hub_server  # noqa: F401
from tests.test_browser_ux import _contrasts, _low_contrast, _pick_gallery, browser_context, served  # noqa: F401


@pytest.fixture()
def page(browser_context, served):  # noqa: ANN001, ANN201
    p = browser_context.new_page(viewport={"width": 1280, "height": 1400})
    p.set_default_timeout(TIMEOUT_MS)
    p.goto(served[0])
    p.locator("#editor .cm-content").wait_for()
    yield p
    p.close()


def test_dark_mode_contrast(browser_context, served) -> None:  # noqa: ANN001
    ctx = browser_context.new_context(color_scheme="dark", viewport={"width": 1280, "height": 1400})
    p = ctx.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    try:
        p.goto(served[0])  # the system preference alone turns gradio dark
        p.locator("#editor .cm-content").wait_for()
        p.click("#use-demo")
        p.locator("#recipe-status .msg-ok").wait_for()
        p.locator("#editor .cm-content").click()
        p.keyboard.press("End")
        p.keyboard.insert_text(" x")  # an invalid recipe: the error colour on the dark background
        p.locator("#recipe-status .msg-error").wait_for()
        assert p.evaluate("() => !!document.querySelector('.dark')")  # gradio's dark theme is on
        low = _low_contrast(p)
        p.locator("#editor .cm-content").click()
        p.keyboard.press("Backspace")
        p.keyboard.press("Backspace")
        p.locator("#recipe-status .msg-ok").wait_for()
        low += _low_contrast(p)
        _set_quants(p, set())
        p.click("#merge")  # the progress panel's own colours, on the dark background
        p.locator('#progress .merge-progress[data-status="done"]').wait_for()
        low += [("progress", *r) for r in _contrasts(p, "#progress .merge-progress-head, #progress .merge-progress-msg")
                if r[2] < 4.5]
        p.screenshot(path=str(ARTIFACTS / "review-dark.png"), full_page=True)
        assert not low, low
    finally:
        ctx.close()


def test_moe_gallery_entry_checks_and_merges(page, served) -> None:  # noqa: ANN001
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    _set_quants(page, set())
    _pick_gallery(page, "MoE", "experts:")
    text = _editor_text(page)
    assert "experts:" in text and "source_model: " in text and "openchat" not in text  # the demo models put in
    page.click("#check")
    page.locator("#report .msg, #report table").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "review-moe-check.png"), full_page=True)
    assert "the merge can run" in page.locator("#report").inner_text()
    page.click("#merge")
    page.locator('#progress .merge-progress[data-status="done"], #progress .merge-progress[data-status="failed"], '
                 '#result .msg-error').first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "review-moe-merged.png"), full_page=True)
    assert page.locator('#progress .merge-progress[data-status="done"]').count() == 1
    assert "✓ Merged" in page.locator("#result").inner_text()
    assert page.locator("#result a", has_text="mergekit_moe_config.yml").count() == 1


def test_merge_publishes_a_separate_gguf_repo(page, served, hub_server) -> None:  # noqa: ANN001
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    _set_quants(page, {"Q8_0"})
    page.locator("#repo-name input, #repo-name textarea").first.fill("split-merge")
    page.locator("#publish input").check()
    page.locator("#gguf-repo input").check()
    page.locator("#repo-note").filter(has_text="GGUF").wait_for()
    assert "/split-merge-GGUF" in page.locator("#repo-note").inner_text()  # the separate repo is announced
    page.click("#check")
    page.locator("#report", has_text="the merge can run").wait_for()
    page.click("#merge")
    page.locator('#progress .merge-progress[data-status="done"], #progress .merge-progress[data-status="failed"]'
                 ).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "review-gguf-repo.png"), full_page=True)
    result = page.locator("#result")
    assert page.locator('#progress .merge-progress[data-status="done"]').count() == 1, result.inner_text()
    files = hub_server.repo_files("alice/split-merge")
    gguf_files = hub_server.repo_files("alice/split-merge-GGUF")
    assert "model.safetensors" in files and not [f for f in files if f.endswith(".gguf")], files
    assert "split-merge-Q8_0.gguf" in gguf_files and "README.md" in gguf_files, gguf_files
    card = hub_server.file_bytes("alice/split-merge", "README.md").decode()
    gguf_card = hub_server.file_bytes("alice/split-merge-GGUF", "README.md").decode()
    assert "merge_method" in card or "mergekit" in card
    assert "llama-cli --hf-repo alice/split-merge-GGUF --hf-file split-merge-Q8_0.gguf" in card
    assert "base_model: alice/split-merge" in gguf_card and "base_model_relation: quantized" in gguf_card
    assert "llama-cli --hf-repo alice/split-merge-GGUF --hf-file split-merge-Q8_0.gguf" in gguf_card
    hrefs = result.locator("a").evaluate_all("els => els.map(e => e.href)")
    assert f"{hub_server.url}/alice/split-merge" in hrefs and f"{hub_server.url}/alice/split-merge-GGUF" in hrefs
    page.screenshot(path=str(ARTIFACTS / "review-gguf-repo.png"), full_page=True)


@pytest.mark.parametrize(("typed", "said"), [("not a repo!!", "is not a Hub repo ID"),
                                             ("alice/no-such-model", "was not found on the Hub"),
                                             ("bob/gated-model", "is gated: accept its licence"),
                                             ("alice/empty-model", "has no model weights")])
def test_quantize_mode_refuses_a_bad_model_in_one_line(page, served, hub_server, typed, said) -> None:  # noqa: ANN001
    if "bob/gated-model" not in hub_server.repos:
        hub_server.create_repo("alice/empty-model")
        hub_server.create_repo("bob/gated-model", gated="manual")
        publish_model(hub_server, "bob/gated-model")
    page.locator("#quantize").get_by_text("Quantize a model").click()
    page.locator("#qm-model input, #qm-model textarea").first.fill(typed)
    page.click("#qm-start")
    page.locator("#qm-result .msg-error").wait_for()
    said_there = page.locator("#qm-result").inner_text().strip()
    assert said_there.startswith("✗") and said in said_there and "\n" not in said_there, said_there
    assert "Traceback" not in page.locator("body").inner_text()
    page.locator("button#qm-cancel[disabled]").wait_for()  # nothing runs any more
    page.screenshot(path=str(ARTIFACTS / f"review-qm-{typed.split('/')[-1].replace(' ', '_')}.png"), full_page=True)
