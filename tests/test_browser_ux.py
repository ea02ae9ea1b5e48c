"""The app as people meet it (issue 15), in Debian's headless Chromium: the check report never describes another
recipe, errors look like errors and are announced, the keyboard can leave the editor, text contrast is at least
4.5:1 (measured from computed styles), a 390 px phone layout, cancel states, the gallery's passthrough example,
Hub loading by Enter, links and search-as-you-type against the local Hub server.

Screenshots of each state land in tests/artifacts/ (git-ignored): ux-*.png (desktop) and ux-phone-*.png.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from merger.app import demo
from merger.app.runs import Run, RunQueue
from merger.pipeline import Event
from tests.sharing_fixtures import publish_model, recipe_of
from tests.test_browser import (ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _editor_text, _free_port,  # noqa: F401
                                _set_quants, hub_server)

MIN_CONTRAST = 4.5  # WCAG 2.1 AA, normal text


class StageHold:
    """The app's job hook: holds the job at the first event of one stage until released or cancelled."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.holding = threading.Event()
        self.events: list[Event] = []

    def __call__(self, job: Run, event: Event) -> None:
        self.events.append(event)
        if self.stage and event.stage == self.stage:
            self.holding.set()
            while self.stage and not job.cancel_event.is_set():
                time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, hub_server) -> Iterator[tuple[str, demo.Settings, StageHold]]:  # noqa: ANN001
    import app as app_module

    publish_model(hub_server, "alice/demo-recipe", tags=["merge", "mergekit"],
                  recipe=recipe_of("linear", ["alice/base-a", "alice/base-b"]))
    root = tmp_path_factory.mktemp("uxroot")
    settings = demo.Settings(space=False, host="127.0.0.1", port=_free_port(), outputs_dir=root / "outputs",
                             demo_dir=root / "demo_models")
    hold = StageHold()
    blocks = app_module.build_app(settings, RunQueue(hook=hold))
    blocks.queue()
    blocks.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True, quiet=True,
                  ssr_mode=False, css=app_module.CSS)
    try:
        yield f"http://{settings.host}:{settings.port}", settings, hold
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url: str, width: int, height: int):  # noqa: ANN001, ANN202
    p = browser.new_page(viewport={"width": width, "height": height})
    p.set_default_timeout(TIMEOUT_MS)
    p.goto(url)
    p.locator("#editor .cm-content").wait_for()
    return p


@pytest.fixture()
def page(browser_context, served):  # noqa: ANN001, ANN201
    p = _open(browser_context, served[0], 1280, 1400)
    yield p
    p.close()


def _replace_editor(page, text: str) -> None:  # noqa: ANN001
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(text)


def _pick_gallery(page, title: str, expect: str) -> None:  # noqa: ANN001
    page.locator("#gallery label", has_text=title).click()
    page.wait_for_function(f"document.querySelector('#editor .cm-content').innerText.includes({expect!r})")


# ---------------------------------------------------------------- state that never lies

def test_report_goes_stale_on_edit_and_merge_refuses_a_failed_check(page, served) -> None:  # noqa: ANN001
    page.click("#use-demo")
    _pick_gallery(page, "SLERP, t = 0.5", "merge_method: slerp")
    page.click("#check")
    page.locator("#report", has_text="the merge can run").wait_for()

    text = _editor_text(page)
    assert "value: 0.5" in text
    _replace_editor(page, text.replace("value: 0.5", "value: 1.5"))
    page.locator("#report .msg-stale").wait_for()
    report = page.locator("#report").inner_text()
    assert "Stale" in report and "the merge can run" not in report
    page.screenshot(path=str(ARTIFACTS / "ux-stale-report.png"), full_page=True)

    page.click("#check")
    page.locator("#report .msg-error", has_text="1.5").wait_for()  # t must lie in [0, 1]
    page.click("#merge")
    page.locator("#run-note .msg-error", has_text="Merge did not start").wait_for()
    page.wait_for_timeout(1500)  # the reason stays: the end of the (not started) job does not wipe it
    assert "Merge did not start" in page.locator("#run-note").inner_text()
    assert page.locator("#progress .merge-progress").count() == 0  # no job was started
    assert page.locator("#cancel").is_disabled()

    _pick_gallery(page, "SLERP gradient", "merge_method: slerp")  # another recipe: the failed report is stale
    page.locator("#report .msg-stale").wait_for()
    assert "1.5" not in page.locator("#report").inner_text().split("Stale")[0]


def test_check_report_counts_a_missing_model(page, served, tmp_path) -> None:  # noqa: ANN001
    page.click("#use-demo")
    _pick_gallery(page, "SLERP, t = 0.5", "merge_method: slerp")
    second = demo.recipe_models(_editor_text(page))[1]
    _replace_editor(page, _editor_text(page).replace(second, str(tmp_path / "gone")))
    page.click("#check")
    report = page.locator("#report")
    report.filter(has_text="Not mergeable").wait_for()
    text = report.inner_text()
    assert "2 model(s), 1 of them could not be read" in text
    assert "not found" in text and "Fix:" in text
    assert " 0 B" not in text and "Download" not in text  # no estimate that counts the missing model as 0 B


# ---------------------------------------------------------------- errors look like errors, once

def _rgb(css: str) -> tuple[float, ...]:
    inner = css[css.index("(") + 1:css.index(")")]
    return tuple(float(x) for x in inner.replace("/", " ").replace(",", " ").split())


def test_errors_are_styled_announced_and_shown_once(page) -> None:  # noqa: ANN001
    _replace_editor(page, "merge_method: slerpp")
    box = page.locator("#recipe-status .msg-error").filter(has_text="slerpp")
    box.wait_for()
    assert box.get_attribute("role") == "alert" and "slerpp" in box.inner_text()
    r, g, b, *_ = _rgb(box.evaluate("el => getComputedStyle(el).color"))
    assert r > 100 and g < 60 and b < 60, (r, g, b)  # red text, not the body's black
    page.screenshot(path=str(ARTIFACTS / "ux-error.png"), full_page=True)

    page.click("#use-demo")  # valid again; a merge that fails before starting says why once
    page.locator("#recipe-status .msg-ok").wait_for()
    page.locator("#publish input").check()
    page.locator("#repo-name input, #repo-name textarea").first.fill("my merge / with spaces?!")
    page.locator("#repo-note .msg-error").wait_for()  # the invalid Hub name is flagged before any work
    page.click("#merge")
    page.locator("#result .msg-error").wait_for()
    body = page.locator("body").inner_text()
    assert body.count("is not a valid") + body.count("not a Hub repo") <= 2  # the note above and the result
    assert page.locator("#result").inner_text().count("✗") == 1
    page.locator("#publish input").uncheck()


def test_repo_name_rewriting_is_shown(page) -> None:  # noqa: ANN001
    page.locator("#repo-name input, #repo-name textarea").first.fill("my merge / with spaces?!")
    page.locator("#repo-note", has_text="with-spaces").wait_for()
    assert "Saved as folder" in page.locator("#repo-note").inner_text()


def test_hub_loading_enter_links_and_errors(page, served, hub_server) -> None:  # noqa: ANN001
    status = page.locator("#recipe-status .msg")
    status.filter(has_text="valid recipe").wait_for()
    status_before = status.inner_text()
    box = page.locator("#hub-repo input, #hub-repo textarea").first
    box.fill("")
    box.press("Enter")
    page.locator("#hub-status .msg-error", has_text="type a Hub model ID").wait_for()
    box.fill("alice/no-such-model")
    box.press("Enter")
    page.locator("#hub-status .msg-error", has_text="no-such-model").wait_for()
    assert status.inner_text() == status_before  # not shown as a broken recipe
    box.fill("https://huggingface.co/alice/demo-recipe/tree/main")
    box.press("Enter")
    page.locator("#hub-status .msg-ok", has_text="alice/demo-recipe").wait_for()
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('alice/base-a')")
    assert "merge_method: linear" in _editor_text(page)


def test_search_as_you_type_against_the_local_hub(page, served) -> None:  # noqa: ANN001
    box = page.locator("#hub-repo input, #hub-repo textarea").first
    box.fill("")
    box.press_sequentially("demo-rec", delay=40)
    choice = page.locator("#hub-suggest label", has_text="alice/demo-recipe")
    choice.wait_for()
    choice.click()
    page.locator("#hub-status .msg-ok", has_text="alice/demo-recipe").wait_for()

    search = page.locator("#model-search input, #model-search textarea").first
    search.press_sequentially("demo-rec", delay=40)
    page.locator("#model-suggest label", has_text="alice/demo-recipe").click()
    page.wait_for_function("document.querySelector('#models-box textarea').value.includes('alice/demo-recipe')")


# ---------------------------------------------------------------- the gallery's passthrough example

def test_passthrough_gallery_recipe_fits_the_demo_models(page) -> None:  # noqa: ANN001
    page.click("#use-demo")
    _pick_gallery(page, "Passthrough frankenmerge", "merge_method: passthrough")
    text = _editor_text(page)
    assert "layer_range: [0, 3]" in text and "layer_range: [1, 4]" in text  # 24/32 and 8/32 of 4 layers
    page.click("#check")
    page.locator("#report", has_text="the merge can run").wait_for()
    # Re-picking the same example restores it after an edit, and a method change clears the choice.
    _replace_editor(page, text.replace("[1, 4]", "[2, 4]"))
    _pick_gallery(page, "Passthrough frankenmerge", "[1, 4]")
    assert page.locator("#gallery input:checked").count() == 0


# ---------------------------------------------------------------- keyboard

def test_tab_leaves_the_editor_and_the_page_says_how_to_indent(page) -> None:  # noqa: ANN001
    assert "Tab" in page.locator("#editor-keys").inner_text() and "Ctrl+]" in page.locator("#editor-keys").inner_text()
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+Home")
    before = _editor_text(page)
    page.keyboard.press("Tab")
    inside = page.evaluate("() => !!document.activeElement.closest('#editor')")
    assert not inside and _editor_text(page) == before
    assert page.evaluate("() => document.activeElement.id || document.activeElement.closest('[id]').id") != ""
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Shift+Tab")
    assert not page.evaluate("() => !!document.activeElement.closest('#editor')")
    assert page.evaluate("() => document.activeElement !== document.body")
    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+Home")
    page.keyboard.press("Control+BracketRight")
    page.wait_for_function("t => document.querySelector('#editor .cm-content').innerText !== t", arg=before)


def test_method_dropdown_keeps_focus(page) -> None:  # noqa: ANN001
    field = page.locator("#method input")
    field.click()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.wait_for_timeout(800)
    assert page.evaluate("() => !!document.activeElement.closest('#method')")


def test_every_tab_stop_has_a_name(page) -> None:  # noqa: ANN001
    page.locator("h1").first.click()
    unnamed, seen = [], 0
    for _ in range(80):
        page.keyboard.press("Tab")
        name = page.evaluate("""() => { const e = document.activeElement;
            if (!e || e === document.body) return 'BODY';
            const lab = e.labels && e.labels.length ? e.labels[0].innerText : '';
            const by = e.getAttribute('aria-labelledby');
            const ref = by ? by.split(' ').map(i => (document.getElementById(i) || {}).innerText || '').join(' ') : '';
            return (e.getAttribute('aria-label') || lab || ref || e.innerText || e.title || e.placeholder
                    || (e.closest('.cm-editor') ? 'editor' : '') || '').trim() || e.outerHTML.slice(0, 120); }""")
        if name == "BODY":  # past the last stop: the page was walked through
            break
        if name.startswith("<"):
            unnamed.append(name)
        seen += 1
    assert not unnamed, unnamed
    assert seen > 25, seen


# ---------------------------------------------------------------- contrast from computed styles

CONTRAST_JS = """(els) => els.map((el) => {
  const parse = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return m.length > 3 ? m : [...m, 1]; };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                               return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  let bg = null;
  for (let n = el; n; n = n.parentElement) {
    const c = parse(getComputedStyle(n).backgroundColor);
    if (c[3] > 0.5) { bg = c; break; }
  }
  bg = bg || [255, 255, 255, 1];
  const pseudo = el.tagName === 'INPUT' || el.tagName === 'TEXTAREA' ? '::placeholder' : null;
  const fg = parse(getComputedStyle(el, pseudo).color);
  const a = fg[3];
  const mix = [0, 1, 2].map((i) => fg[i] * a + bg[i] * (1 - a));
  const [l1, l2] = [lum(mix), lum(bg)].sort((x, y) => y - x);
  return [el.id || el.className || el.tagName, el.innerText ? el.innerText.slice(0, 30) : '', (l1 + 0.05) / (l2 + 0.05)];
})"""


def _contrasts(page, selector: str) -> list[tuple[str, str, float]]:  # noqa: ANN001
    found = page.locator(selector)
    assert found.count() > 0, f"nothing matches {selector}"
    return [tuple(r) for r in found.evaluate_all(CONTRAST_JS)]


CONTRAST_CHECKED = {
    "labels": "[data-testid='block-info'], label span, #gallery label span",
    "placeholders": "#hub-repo textarea, #hub-repo input, #model-search input, #model-search textarea",
    "yaml keys": "#editor .cm-line span",
    "buttons": "button#merge, button#check, button#cancel",
    "status": "#recipe-status .msg, #recipe-status .msg *",  # the text itself, not only its box
}


def _low_contrast(page) -> list[tuple]:  # noqa: ANN001
    """Every restyled text below 4.5:1 against the background it is drawn on."""
    return [(what, *r) for what, selector in CONTRAST_CHECKED.items() for r in _contrasts(page, selector)
            if r[2] < MIN_CONTRAST]


def test_text_contrast_is_at_least_4_5(page) -> None:  # noqa: ANN001
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    low = _low_contrast(page)
    assert not low, low
    page.screenshot(path=str(ARTIFACTS / "ux-desktop.png"), full_page=True)


# ---------------------------------------------------------------- a 390 px phone

def test_phone_layout(browser_context, served) -> None:  # noqa: ANN001
    p = _open(browser_context, served[0], 390, 844)
    try:
        p.click("#use-demo")
        p.locator("#recipe-status .msg-ok").wait_for()
        editor_top = p.locator("#editor").bounding_box()["y"]
        gallery_top = p.locator("#gallery").bounding_box()["y"]
        assert editor_top < gallery_top, (editor_top, gallery_top)  # the editor comes before the whole gallery
        assert editor_top < 3 * 844, editor_top
        p.click("#check")
        p.locator("#report", has_text="the merge can run").wait_for()
        cells = p.locator("#report td").evaluate_all(
            "els => els.map(e => [e.innerText, e.getBoundingClientRect().height,"
            " parseFloat(getComputedStyle(e).lineHeight) || 20])")
        squeezed = [c for c in cells if c[0].strip() and c[1] > 2.5 * c[2]]
        assert not squeezed, squeezed  # no cell wraps into a column of single letters
        assert p.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # the table scrolls, not the page
        p.screenshot(path=str(ARTIFACTS / "ux-phone-check.png"), full_page=True)
        p.screenshot(path=str(ARTIFACTS / "ux-phone.png"))
    finally:
        p.close()


# ---------------------------------------------------------------- cancel

def test_cancel_states(page, served) -> None:  # noqa: ANN001
    url, settings, hold = served
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    assert page.locator("#cancel").is_disabled()  # nothing runs: Cancel is not offered
    _set_quants(page, set())
    hold.holding.clear()
    hold.stage = "merge"
    try:
        page.click("#merge")  # not checked as it is: the page says the job checks it first
        page.locator("#run-note", has_text="not checked").wait_for()
        assert hold.holding.wait(30)
        page.locator("button#cancel:not([disabled])").wait_for()
        low = [r for r in _contrasts(page, "button#cancel, button#merge") if r[2] < MIN_CONTRAST]
        assert not low, low
        page.click("#cancel")
        page.locator('#progress .merge-progress[data-status="cancelled"]').wait_for()
    finally:
        hold.stage = None
    assert page.locator("#progress progress").count() == 0  # no (full, green) bar for a cancelled job
    assert "Cancelled" in page.locator("#progress").inner_text()
    assert "Cancelling" not in page.locator("#report").inner_text()
    page.locator("button#cancel[disabled]").wait_for()
    page.screenshot(path=str(ARTIFACTS / "ux-cancelled.png"), full_page=True)


def test_cancel_during_gguf_verification_stops_promptly(page, served) -> None:  # noqa: ANN001
    url, settings, hold = served
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    _set_quants(page, {"Q8_0", "Q4_K_M"})
    hold.events.clear()
    hold.holding.clear()
    hold.stage = "verify"
    try:
        page.click("#merge")
        assert hold.holding.wait(120), [e.stage for e in hold.events]
        page.click("#cancel")
        started = time.monotonic()
        page.locator('#progress .merge-progress[data-status="cancelled"]').wait_for()
        seconds = time.monotonic() - started
    finally:
        hold.stage = None
    measured = [e.message for e in hold.events if e.stage == "verify" and e.message.startswith("measuring")]
    assert len(measured) == 1, measured  # no further file was verified after the cancel
    assert seconds < 10, seconds
    assert not list(settings.outputs_dir.rglob("*.gguf"))


# ---------------------------------------------------------------- results

def test_results_have_verdicts_and_download_links(page, served) -> None:  # noqa: ANN001
    page.click("#use-demo")
    page.locator("#recipe-status .msg-ok").wait_for()
    page.locator("#repo-name input, #repo-name textarea").first.fill("results-demo")
    _set_quants(page, {"Q4_K_M"})
    page.click("#check")
    page.locator("#report", has_text="the merge can run").wait_for()
    page.click("#merge")
    page.locator('#progress .merge-progress[data-status="done"]').wait_for()
    result = page.locator("#result")
    assert "✓ pass" in result.inner_text()
    verdicts = result.locator("tr", has_text=".gguf").locator("td:nth-child(2) strong").all_inner_texts()
    assert verdicts and all(v.startswith(("✓", "✗")) for v in verdicts), verdicts
    assert "falls back" in result.inner_text() or "fallback" in result.inner_text()  # 64-wide rows: not K-quants
    # table headers never wrap inside a word ("verdi / ct" on a desktop before)
    assert set(result.locator("th").evaluate_all("hs => hs.map(h => getComputedStyle(h).whiteSpace)")) == {"nowrap"}
    assert "<code>" not in result.inner_text()  # the evaluation's samples are rendered as code, not shown raw
    link = result.locator("a", has_text="config.json").first
    href = link.get_attribute("href")
    body = page.evaluate("h => fetch(h).then(r => r.ok ? r.text() : 'HTTP ' + r.status)", href)
    assert '"architectures"' in body
    page.screenshot(path=str(ARTIFACTS / "ux-results.png"), full_page=True)


# ---------------------------------------------------------------- quantize a model (no merge)

def test_quantize_a_model_to_a_gguf_repo(page, served, hub_server) -> None:  # noqa: ANN001
    url, settings, hold = served
    model = settings.demo_dir / "base"
    page.locator("#quantize").get_by_text("Quantize a model").click()
    page.locator("#qm-model input, #qm-model textarea").first.fill(str(model))
    page.locator("#qm-repo input, #qm-repo textarea").first.fill("alice/base-GGUF")
    for label, value in demo.gguf_choices():
        box = page.locator("#qm-quants label", has_text=f"{value}:").locator("input")
        if box.is_checked() != (value == "Q8_0"):
            box.click()
    page.locator("#qm-publish input").check()
    page.click("#qm-start")
    page.locator('#qm-progress .merge-progress[data-status="done"]').wait_for()
    result = page.locator("#qm-result").inner_text()
    assert "✓ Quantized" in result and "base-GGUF-Q8_0.gguf" not in result and "base-Q8_0.gguf" in result
    assert f"{hub_server.url}/alice/base-GGUF" in result
    files = hub_server.repo_files("alice/base-GGUF")
    assert "base-Q8_0.gguf" in files and "README.md" in files
    card = hub_server.file_bytes("alice/base-GGUF", "README.md").decode()
    assert "llama-cli --hf-repo alice/base-GGUF --hf-file base-Q8_0.gguf" in card
    assert "base_model_relation: quantized" not in card  # a local folder has no Hub parent to name
    page.screenshot(path=str(ARTIFACTS / "ux-quantized.png"), full_page=True)


def test_hub_loading_shows_progress_only_under_the_load_box(page, served, hub_server) -> None:  # noqa: ANN001
    """A slow Hub (rate-limited twice, so the client waits and retries) keeps the editor and the models usable."""
    hub_server.inject("info", "rate_limit", times=2, retry_after=1)
    box = page.locator("#hub-repo input, #hub-repo textarea").first
    box.fill("alice/demo-recipe")
    box.press("Enter")
    covered, shown = set(), False
    started = time.monotonic()
    deadline = started + 30
    while time.monotonic() < deadline and not page.locator("#hub-status .msg-ok").count():
        state = page.evaluate("""() => ({
            covered: ['#editor', '#models-box', '#method', '#repo-name', '#recipe-status'].filter(
                s => document.querySelector(s + ' .wrap.full:not(.hide)')),
            shown: !!document.querySelector('#hub-status .wrap.full:not(.hide)')})""")
        covered |= set(state["covered"])
        shown = shown or state["shown"]
        time.sleep(0.05)
    hub_server.clear_faults()
    page.locator("#hub-status .msg-ok").wait_for()
    assert time.monotonic() - started > 1.0  # the Hub was slow, so an overlay would have been seen
    assert shown, "the load showed no progress at all"
    assert not covered, covered
