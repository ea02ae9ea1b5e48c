"""The logic behind issue 15's page fixes, without a browser: pasted Hub links, the stale report and the Merge
gate, the repo-name note, the gallery's layer ranges scaled to the models put in, and job states."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from merger.app import demo, page
from merger.app.gallery import fit_layer_ranges, gallery_entry
from merger.app.hubsearch import Suggester, hub_ref, hub_refs_in_lines
from merger.app.runs import CANCELLED, FAILED, Snapshot
from merger.errors import RecipeError
from merger.recipe import parse_recipe
from tests.hubserver import HubServer, use_hub
from tests.sharing_fixtures import publish_model


@pytest.mark.parametrize("typed, repo", [
    ("org/name", "org/name"),
    ("  org/name@v2 ", "org/name@v2"),
    ("https://huggingface.co/org/name", "org/name"),
    ("https://huggingface.co/org/name/tree/main", "org/name"),
    ("https://huggingface.co/org/name/tree/v1.0", "org/name@v1.0"),
    ("https://huggingface.co/org/name/blob/main/config.json", "org/name"),
    ("huggingface.co/org/name", "org/name"),
    ("https://hf.co/org/name/", "org/name"),
])
def test_pasted_hub_links_become_repo_ids(typed: str, repo: str) -> None:
    assert hub_ref(typed) == repo


@pytest.mark.parametrize("typed, says", [
    ("", "type a Hub model ID"),
    ("   ", "type a Hub model ID"),
    (None, "type a Hub model ID"),
    ("https://example.com/org/name", "not a Hugging Face model link"),
    ("https://huggingface.co/datasets/org/name", "is a dataset, not a model"),
    ("https://huggingface.co/org", "names no model"),
])
def test_bad_load_input_says_what_to_write(typed: str | None, says: str) -> None:
    with pytest.raises(RecipeError, match=says):
        hub_ref(typed, "Load")


def test_models_box_links_are_rewritten_in_place() -> None:
    box = "https://huggingface.co/org/a\norg/b  # the base\n\nhttps://huggingface.co/org/c/tree/dev"
    assert hub_refs_in_lines(box) == "org/a\norg/b  # the base\n\norg/c@dev"


def test_report_is_stale_after_an_edit_and_merge_gate() -> None:
    last = page.checked("merge_method: slerp\n", True, "### Check: ✓ **OK**: the merge can run\n\nNo problems found.")
    assert page.report_for("merge_method: slerp\n", last) == last["report"]  # the same text (e.g. after undo)
    stale = page.report_for("merge_method: slerp\n# edited\n", last)
    assert "Stale" in stale and "the merge can run" not in stale and "No problems found." in stale
    assert page.report_for("anything", None) == ""
    assert page.merge_gate("merge_method: slerp\n", last) is None
    assert page.unchecked_note("merge_method: slerp\n", last) is None
    assert "not checked" in page.unchecked_note("merge_method: slerp\n# edited\n", last)
    failed = page.checked("t: 1.5", False, "✗ ...")
    assert "found errors" in page.merge_gate("t: 1.5", failed)
    assert page.merge_gate("t: 0.5", failed) is None  # edited since: the job checks it first


def test_repo_name_note_shows_the_rewriting() -> None:
    note = page.repo_note("my merge / with spaces?!", "", publish=False, gguf_repo=False, quants=[])
    assert "`with-spaces`" in note and "Saved as folder" in note
    published = page.repo_note("my merge / with spaces?!", "", publish=True, gguf_repo=False, quants=[])
    assert 'role="alert"' in published
    ok = page.repo_note("alice/demo", "", publish=True, gguf_repo=True, quants=["Q4_K_M"])
    assert "`alice/demo`" in ok and "`alice/demo-GGUF`" in ok
    assert page.repo_note("demo", "", publish=False, gguf_repo=False, quants=[]) == ""


def test_passthrough_gallery_recipe_is_valid_on_the_demo_models(tmp_path: Path) -> None:
    models = [str(p) for p in demo.ensure_demo_models(tmp_path / "demo").values()]
    entry = gallery_entry("passthrough-frankenmerge.yml")
    assert entry.layers == 32
    text = fit_layer_ranges(demo.gallery_recipe(entry.text, models), entry.layers, lambda m: demo.layer_count(m, None))
    assert "layer_range: [0, 3]" in text and "layer_range: [1, 4]" in text  # 24/32 and 8/32..32/32 of 4 layers
    from merger.pipeline import check

    assert check(parse_recipe(text)).ok
    assert fit_layer_ranges(entry.text, 32, lambda m: 32) == entry.text  # its own models: unchanged


def _snap(status: str, **kw) -> Snapshot:  # noqa: ANN003
    return Snapshot("j", status, status, kw.pop("fraction", 1.0), kw.pop("message", ""), 0, 0, None, (), **kw)


def test_ended_jobs_show_no_progress_bar() -> None:
    cancelled = demo.render_progress(_snap(CANCELLED, message="cancelled; everything it wrote was removed"))
    assert "<progress" not in cancelled and "Cancelled" in cancelled
    failed = _snap(FAILED, error="output folder x exists", message="failed: output folder x exists")
    assert "<progress" not in demo.render_progress(failed) and "output folder" not in demo.render_progress(failed)


def test_suggestions_come_from_the_local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as hub:
        use_hub(hub, monkeypatch, tmp_path / "hf_home")
        for name, downloads in (("alice/tiny-llama", 5), ("bob/tiny-llama-chat", 50), ("bob/other", 500)):
            publish_model(hub, name, downloads=downloads)
        suggester = Suggester(debounce=0)
        assert suggester.suggest("tiny-ll") == ["bob/tiny-llama-chat", "alice/tiny-llama"]  # most downloaded first
        assert suggester.suggest("t") == []  # too short to ask
        assert suggester.suggest("https://huggingface.co/bob/other") == ["bob/other"]
        before = hub.stats.requests["search"]
        assert suggester.suggest("tiny-ll") == ["bob/tiny-llama-chat", "alice/tiny-llama"]  # cached
        assert hub.stats.requests["search"] == before


def test_suggestions_are_debounced_per_visitor(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from merger.app import hubsearch

    asked: list[str] = []
    monkeypatch.setattr(hubsearch, "_search", lambda term, token: asked.append(term) or [f"org/{term}"])
    suggester = Suggester(debounce=0.3)
    answers: dict[str, object] = {}
    typing = threading.Thread(target=lambda: answers.__setitem__("abc", suggester.suggest("abc", visitor="v")))
    typing.start()
    time.sleep(0.1)
    answers["abcd"] = suggester.suggest("abcd", visitor="v")
    typing.join()
    assert answers == {"abc": None, "abcd": ["org/abcd"]} and asked == ["abcd"]  # the pause, not each key
    assert suggester.suggest("abc", visitor="w") == ["org/abc"]  # another visitor is not held up
