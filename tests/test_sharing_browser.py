"""Community sharing in a real browser (Chromium + Playwright) against the local Hub: deep links, browse,
family tree, share, publish a recipe, community gallery. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import pytest

from merger.app.gallery.community import clear_cache
from merger.card import ParentInfo, build_card
from merger.recipe import parse_recipe
from tests.hubserver import HubServer
from tests.sharing_fixtures import publish_model
from tests.test_browser import ARTIFACTS, TIMEOUT_MS, hub_server, page, served  # noqa: F401  (fixtures)

DATASET = "llm-merger/community-recipes"
RECIPE = ("models:\n  - model: acme/base\n  - model: acme/chat\n    parameters: {weight: 0.5, density: 0.6}\n"
          "merge_method: ties\nbase_model: acme/base\ndtype: float16\n")


@pytest.fixture(scope="module")
def shared(hub_server: HubServer) -> dict[str, str]:  # noqa: F811
    """acme/merged: a TIES merge of acme/base and its fine-tune acme/chat, with this tool's card."""
    shas = {"acme/base": publish_model(hub_server, "acme/base"),
            "acme/chat": publish_model(hub_server, "acme/chat", bases=["acme/base"])}
    card = build_card(parse_recipe(RECIPE), parents=[ParentInfo(r, s, "apache-2.0") for r, s in shas.items()],
                      output_name="acme/merged")
    publish_model(hub_server, "acme/merged", readme=str(card), recipe=RECIPE, likes=3)
    hub_server.create_repo(f"datasets/{DATASET}")
    clear_cache()
    return shas


def _editor(page) -> str:  # noqa: ANN001
    return page.locator("#editor .cm-content").inner_text()


def _open(page, url: str) -> None:  # noqa: ANN001
    page.goto(url)
    page.locator("#editor .cm-content").wait_for()


def test_deep_link_from_model_opens_a_pinned_remix(page, served, shared) -> None:  # noqa: ANN001, F811
    url = served[0]
    _open(page, f"{url}/?from=acme/merged")
    sha = shared["acme/chat"]
    page.wait_for_function(f"document.querySelector('#editor .cm-content').innerText.includes('acme/chat@{sha}')")
    assert f"acme/base@{shared['acme/base']}" in _editor(page)
    assert page.locator("#repo-name textarea, #repo-name input").first.input_value().endswith("merged-remix")
    page.locator("#recipe-status", has_text="Remixing acme/merged").wait_for()
    assert "2 parent(s) pinned" in page.locator("#recipe-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "sharing-deep-link.png"), full_page=True)


def test_browse_pick_family_tree_and_share(page, served, shared) -> None:  # noqa: ANN001, F811
    url = served[0]
    page.locator("#community").get_by_text("Community: browse, remix and share").first.click()
    page.locator("#browse-base input, #browse-base textarea").first.fill("acme/base")
    page.click("#browse-go")
    row = page.locator('#browse-results [role="gridcell"][data-row="0"][data-col="0"]', has_text="acme/merged")
    row.wait_for()
    assert "1 merged model(s)" in page.locator("#browse-status").inner_text()
    row.click()
    model = page.locator("#community-model textarea, #community-model input").first
    page.wait_for_function("(el) => el.value === 'acme/merged'", arg=model.element_handle())
    page.click("#lineage-button")
    page.locator("#lineage svg.lineage").wait_for()
    edges = page.locator("#lineage .lineage-edge .lineage-method").all_text_contents()
    assert sorted(edges) == ["finetune", "ties", "ties"]
    assert page.locator("#lineage .lineage-node").count() == 3
    page.screenshot(path=str(ARTIFACTS / "sharing-family-tree.png"), full_page=True)

    page.click("#remix")
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('acme/chat@')")
    page.click("#share")
    link = page.locator("#share-link textarea, #share-link input").first
    page.wait_for_function("(el) => el.value.includes('?from=')", arg=link.element_handle(), timeout=10_000)
    assert link.input_value() == f"{url}/?from=acme/merged"

    page.locator("#editor .cm-content").click()
    page.keyboard.press("Control+End")
    page.keyboard.type("\nout_dtype: bfloat16")
    page.click("#share")
    page.wait_for_function("(el) => el.value.includes('?recipe=')", arg=link.element_handle())
    shared_link = link.input_value()
    assert len(shared_link) <= 2000
    edited = _editor(page)
    _open(page, shared_link)
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('out_dtype: bfloat16')")
    assert _editor(page) == edited


def test_publish_recipe_then_community_gallery(page, served, shared, hub_server: HubServer) -> None:  # noqa: ANN001, F811
    url = served[0]
    _open(page, f"{url}/?from=acme/merged")
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('acme/chat@')")
    page.locator("#community").get_by_text("Community: browse, remix and share").first.click()
    page.locator("#recipe-title input, #recipe-title textarea").first.fill("TIES of base and chat")
    page.locator("#recipe-description input, #recipe-description textarea").first.fill("A pinned remix.")
    page.click("#publish-recipe")
    page.locator("#publish-result", has_text="discussions/1").wait_for()
    key = f"datasets/{DATASET}"
    [pull] = hub_server.pull_requests(key)
    assert pull.author == "alice" and pull.title == "Add recipe: TIES of base and chat"
    hub_server.merge_pull(key, 1)
    clear_cache()
    _open(page, url)
    choice = page.locator("#gallery label", has_text="TIES of base and chat (community)")
    choice.wait_for(timeout=TIMEOUT_MS)
    choice.click()
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('merge_method: ties')")
    page.screenshot(path=str(ARTIFACTS / "sharing-community-gallery.png"), full_page=True)


def test_merge_of_a_remix_publishes_a_card_that_links_its_source(page, served, hub_server: HubServer,  # noqa: ANN001, F811
                                                                 tiny) -> None:  # noqa: ANN001
    """A real merge from a deep link: the parents are pinned and the published card says what it remixes."""
    from tests.test_browser import _set_quants, _wait_status

    url = served[0]
    shas = {"acme/tbase": hub_server.upload_folder(tiny["base"], "acme/tbase"),
            "acme/tchat": hub_server.upload_folder(tiny["chat"], "acme/tchat")}
    text = RECIPE.replace("acme/base", "acme/tbase").replace("acme/chat", "acme/tchat")
    card = build_card(parse_recipe(text), parents=[ParentInfo(r, s, "apache-2.0") for r, s in shas.items()],
                      output_name="acme/tmerged")
    publish_model(hub_server, "acme/tmerged", readme=str(card), recipe=text)
    _open(page, f"{url}/?from=acme/tmerged")
    page.wait_for_function(f"document.querySelector('#editor .cm-content').innerText.includes('acme/tchat@{shas['acme/tchat']}')")
    page.locator("#publish input").check()
    page.locator("#repo-name textarea, #repo-name input").first.fill("alice/tmerged-remix")
    _set_quants(page, set())
    page.click("#merge")
    _wait_status(page, "done")
    published = hub_server.file_bytes("alice/tmerged-remix", "README.md").decode()
    assert "Remixed from [acme/tmerged](https://huggingface.co/acme/tmerged)" in published
    assert "## Lineage" in published and "- [acme/tchat](https://huggingface.co/acme/tchat) (ties)" in published
    assert f"acme/tchat@{shas['acme/tchat']}" in hub_server.file_bytes("alice/tmerged-remix",
                                                                        "mergekit_config.yml").decode()
    page.locator("#publish input").uncheck()
