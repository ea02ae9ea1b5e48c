"""Community sharing against the local Hub: the recipe browser, lineage, remix, links, recipe pull requests."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from merger.app import browser, remix, share
from merger.app.browser import RecipeBrowser, RecipeQuery
from merger.app.gallery import gallery_entry
from merger.app.gallery.community import clear_cache, load_community, safe_load_community
from merger.app.lineage import render_svg
from merger.card import ParentInfo, build_card
from merger.errors import HubError, RecipeError
from merger.lineage import card_facts, family_tree, pins_in_recipe, revisions_in_card
from merger.recipe import parse_recipe
from tests.hubserver import HubServer
from tests.sharing_fixtures import model_card, publish_model, recipe_of

DATASET = "llm-merger/community-recipes"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listed(hub: HubServer) -> HubServer:
    """Three merges of meta/base (found three ways), a fine-tune that is no merge, a private merge."""
    publish_model(hub, "meta/base")
    publish_model(hub, "acme/slerp-a", bases=["meta/base", "org/chat"], tags=["merge", "mergekit", "slerp"],
                  parameters=7_000_000_000, likes=5, downloads=100,
                  recipe=recipe_of("slerp", ["meta/base", "org/chat"]))
    publish_model(hub, "acme/ties-b", bases=["meta/base", "org/code"], tags=["merge", "mergekit"],
                  model_type="mistral", parameters=1_000_000_000, likes=9, downloads=10, license="mit",
                  recipe=recipe_of("ties", ["meta/base", "org/code"], base="meta/base"))
    publish_model(hub, "bob/relation-only", bases=["meta/base", "x/y"], relation="merge",
                  parameters=13_000_000_000, likes=1, downloads=1000, recipe=recipe_of("linear", ["meta/base", "x/y"]))
    publish_model(hub, "acme/finetune", bases=["meta/base"], likes=50, downloads=5000)
    publish_model(hub, "alice/secret-merge", bases=["meta/base", "org/chat"], tags=["merge"], private=True,
                  recipe=recipe_of("linear", ["meta/base", "org/chat"]))
    return hub


def repos(rows: list[browser.RecipeRow]) -> list[str]:
    return [r.repo for r in rows]


def test_search_lists_merges_with_method_parents_licence(listed: HubServer) -> None:
    rows = RecipeBrowser().search(RecipeQuery())
    assert repos(rows) == ["acme/ties-b", "acme/slerp-a"]  # by likes 9, 5; no fine-tune, no private repo
    ties, slerp = rows
    assert (ties.method, ties.parents, ties.license, ties.parameters) == (
        "ties", ("meta/base", "org/code"), "mit", 1_000_000_000)  # method read from its mergekit_config.yml
    assert (slerp.method, slerp.license, slerp.likes, slerp.downloads) == ("slerp", "apache-2.0", 5, 100)
    assert ties.cells()[:4] == ["acme/ties-b", "ties", "meta/base, org/code", "mit"] and ties.cells()[6] == "1.0B"


def test_search_filters(listed: HubServer) -> None:
    b = RecipeBrowser()
    # the base-model filter also finds a merge known only by base_model_relation: merge
    assert repos(b.search(RecipeQuery(base_model="meta/base", sort="downloads"))) == [
        "bob/relation-only", "acme/slerp-a", "acme/ties-b"]
    assert repos(b.search(RecipeQuery(base_model="org/code"))) == ["acme/ties-b"]
    assert repos(b.search(RecipeQuery(architecture="mistral"))) == ["acme/ties-b"]
    assert repos(b.search(RecipeQuery(size="under 3B"))) == ["acme/ties-b"]
    assert repos(b.search(RecipeQuery(size="3B to 9B"))) == ["acme/slerp-a"]
    assert repos(b.search(RecipeQuery(base_model="meta/base", size="9B to 20B"))) == ["bob/relation-only"]
    assert repos(b.search(RecipeQuery(method="slerp"))) == ["acme/slerp-a"]
    assert repos(b.search(RecipeQuery(method="ties"))) == ["acme/ties-b"]
    assert repos(b.search(RecipeQuery(search="SLERP"))) == ["acme/slerp-a"]
    assert repos(b.search(RecipeQuery(limit=1))) == ["acme/ties-b"]
    assert repos(b.search(RecipeQuery(), token="hf_alice_write")) == ["acme/ties-b", "acme/slerp-a",
                                                                      "alice/secret-merge"]


def test_search_sorts_by_recency(listed: HubServer) -> None:
    b = RecipeBrowser(ttl=0)  # no cache: the second search must see the new commit
    assert repos(b.search(RecipeQuery(sort="recent"))) == ["acme/ties-b", "acme/slerp-a"]
    listed.commit_files("acme/slerp-a", {"notes.md": b"updated"})
    assert repos(b.search(RecipeQuery(sort="recent"))) == ["acme/slerp-a", "acme/ties-b"]


def test_search_is_cached_per_query_and_token(listed: HubServer) -> None:
    clock = Clock()
    b = RecipeBrowser(ttl=300, clock=clock)
    first = b.search(RecipeQuery())
    calls = listed.stats.requests["search"]
    assert calls == 2  # one listing per merge tag (merge, mergekit)
    assert b.search(RecipeQuery()) == first and listed.stats.requests["search"] == calls
    b.search(RecipeQuery(), token="hf_alice_write")  # another token sees other models: not from the cache
    assert listed.stats.requests["search"] == calls + 2
    clock.now += 299
    b.search(RecipeQuery())
    assert listed.stats.requests["search"] == calls + 2
    clock.now += 2
    b.search(RecipeQuery())
    assert listed.stats.requests["search"] == calls + 4


@pytest.mark.parametrize("query,words", [
    (RecipeQuery(base_model="not a repo"), "not a Hub model id"),
    (RecipeQuery(method="slerpp"), "'slerpp' is not a merge method"),
    (RecipeQuery(size="huge"), "size 'huge' is not offered"),
    (RecipeQuery(sort="stars"), "sort 'stars' is not offered"),
    (RecipeQuery(architecture="llama; drop"), "is not a model type"),
])
def test_search_refuses_bad_filters_before_asking_the_hub(hub: HubServer, query: RecipeQuery, words: str) -> None:
    with pytest.raises(RecipeError, match=words):
        RecipeBrowser().search(query)
    assert hub.stats.requests["search"] == 0


def test_search_hub_failure_is_one_line(hub: HubServer) -> None:
    hub.inject("search", "server_error", times=None)
    with pytest.raises(HubError, match=r"server error \(HTTP 500\)"):
        RecipeBrowser().search(RecipeQuery())


# ---------------------------------------------------------------- lineage

@pytest.fixture
def family(hub: HubServer) -> HubServer:
    publish_model(hub, "meta/base")
    publish_model(hub, "org/chat", bases=["meta/base"])
    publish_model(hub, "org/code", bases=["meta/base"], relation="finetune")
    publish_model(hub, "acme/merge1", bases=["org/chat", "org/code"], tags=["merge", "slerp"])
    publish_model(hub, "acme/merge2", bases=["acme/merge1", "gone/missing"], tags=["merge"],
                  recipe=recipe_of("dare_ties", ["acme/merge1", "gone/missing"], base="acme/merge1"))
    return hub


def test_family_tree_reads_parents_of_parents(family: HubServer) -> None:
    tree = family_tree(["acme/merge2"])
    assert {(e.parent, e.child, e.label) for e in tree.edges} == {
        ("acme/merge1", "acme/merge2", "dare_ties"), ("gone/missing", "acme/merge2", "dare_ties"),
        ("org/chat", "acme/merge1", "slerp"), ("org/code", "acme/merge1", "slerp"),
        ("meta/base", "org/chat", "finetune"), ("meta/base", "org/code", "finetune")}
    assert {r: n.depth for r, n in tree.nodes.items()} == {
        "acme/merge2": 0, "acme/merge1": 1, "gone/missing": 1, "org/chat": 2, "org/code": 2, "meta/base": 3}
    assert "was not found" in tree.nodes["gone/missing"].unavailable
    assert not tree.truncated and tree.nodes["meta/base"].license == "apache-2.0"
    small = family_tree(["acme/merge2"], max_nodes=2)
    assert small.truncated and len([n for n in small.nodes.values() if not n.unavailable]) == 2


def test_lineage_svg_is_offline_markup_with_methods_on_edges(family: HubServer) -> None:
    html = render_svg(family_tree(["acme/merge2"]))
    svg = ET.fromstring(html[html.index("<svg"):html.index("</svg>") + 6])
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = svg.findall(".//s:a", ns)
    edges = svg.findall(".//s:g[@class='lineage-edge']", ns)
    assert sorted(a.get("data-repo") for a in nodes) == sorted(
        ["acme/merge2", "acme/merge1", "gone/missing", "org/chat", "org/code", "meta/base"])
    assert len(edges) == 6
    labels = sorted(e.find("s:text", ns).text for e in edges)
    assert labels == ["dare_ties", "dare_ties", "finetune", "finetune", "slerp", "slerp"]
    top = {a.get("data-repo"): float(a.find("s:rect", ns).get("y")) for a in nodes}
    for edge in edges:  # every parent is drawn above its child
        assert top[edge.get("data-parent")] < top[edge.get("data-child")]
    assert top["meta/base"] < top["org/chat"] < top["acme/merge1"] < top["acme/merge2"]
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert 'stroke-dasharray' in html  # the unreadable parent is drawn dashed


def test_card_revisions_and_recipe_pins() -> None:
    sha_a, sha_b = "a" * 40, "b" * 40
    recipe = parse_recipe(recipe_of("linear", ["acme/base", "acme/chat"]))
    card = str(build_card(recipe, parents=[ParentInfo("acme/base", sha_a, "mit"), ParentInfo("acme/chat", sha_b, "mit")],
                          output_name="bob/m"))
    assert revisions_in_card(card) == {"acme/base": sha_a, "acme/chat": sha_b}
    assert pins_in_recipe(f"models:\n  - model: x/y@{sha_a}\n  - model: x/z@main\nbase_model: q/r@{sha_b}\n") == {
        "x/y": sha_a, "q/r": sha_b}


# ---------------------------------------------------------------- remix

def test_remix_pins_every_parent_it_knows(hub: HubServer) -> None:
    base_sha = publish_model(hub, "acme/base")
    chat_sha = publish_model(hub, "acme/chat", bases=["acme/base"])
    pinned = "c" * 40
    text = ("models:\n  - model: acme/base\n  - model: acme/chat\n    parameters: {weight: 0.3}\n"
            f"  - model: acme/extra\n  - model: acme/fixed@{pinned}\nmerge_method: linear\nparameters: {{weight: 1.0}}\n"
            "dtype: float16\n")
    recipe = parse_recipe(text.replace(f"@{pinned}", ""))
    card = build_card(recipe, parents=[ParentInfo("acme/base", base_sha, "mit"), ParentInfo("acme/chat", chat_sha, "mit"),
                                       ParentInfo("acme/extra", None, "mit")], output_name="acme/merged")
    publish_model(hub, "acme/merged", readme=str(card), recipe=text)
    made = remix.remix("acme/merged", username="bob")
    assert made.pinned == {"acme/base": base_sha, "acme/chat": chat_sha, "acme/fixed": pinned}
    assert made.unpinned == ("acme/extra",)
    assert made.repo_name == "bob/merged-remix"
    refs = {r.repo: r.revision for r in parse_recipe(made.text).referenced_models()}
    assert refs == {"acme/base": base_sha, "acme/chat": chat_sha, "acme/extra": None, "acme/fixed": pinned}
    assert "weight: 0.3" in made.text  # the rest of the recipe is kept as written
    assert "`acme/extra`" in made.status() and "3 parent(s) pinned" in made.status()
    assert card_facts("acme/merged").revisions == {"acme/base": base_sha, "acme/chat": chat_sha, "acme/fixed": pinned}


def test_remix_name_and_recognition() -> None:
    assert remix.remix_name("org/" + "x" * 120, None) == "x" * 90 + "-remix"
    assert remix.remix_name("org/My Model!", "bob") == "bob/My-Model-remix"
    state = {"source": "acme/merged", "models": ["acme/base@" + "a" * 40, "acme/chat"], "text": ""}
    assert remix.still_remix(state["models"], "models:\n  - model: acme/chat\nmerge_method: linear\n")
    assert not remix.still_remix(state["models"], "models:\n  - model: other/one\nmerge_method: linear\n")


def test_remix_of_a_model_without_recipe_is_one_line(hub: HubServer) -> None:
    publish_model(hub, "acme/plain")
    with pytest.raises(HubError, match="neither mergekit_config.yml nor a YAML recipe"):
        remix.remix("acme/plain")


# ---------------------------------------------------------------- links

def _query(link: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(link).query))


def test_recipe_link_round_trip_within_url_limits() -> None:
    text = gallery_entry("dare-ties-int8-mask.yml").text
    link = share.recipe_link("http://127.0.0.1:7860", text)
    assert link.startswith("http://127.0.0.1:7860/?recipe=") and len(link) <= share.MAX_URL
    assert share.parse_link(_query(link)).recipe == text
    long = "".join(f"models:\n  - model: org/model-{i:04d}-{(i * 7919) % 10007:05d}\n" for i in range(400))
    with pytest.raises(RecipeError, match=r"too long for a link \(\d+ characters, the limit is 2000\)"):
        share.recipe_link("http://x", long)
    assert share.parse_link({}) is None


def test_model_link_and_damaged_links() -> None:
    link = share.model_link("https://me-app.hf.space/", "org/model@main")
    assert link == "https://me-app.hf.space/?from=org/model@main"
    assert share.parse_link(_query(link)).model == "org/model@main"
    with pytest.raises(RecipeError):
        share.parse_link({"from": "../../etc/passwd"})
    packed = share.recipe_link("http://x", "merge_method: linear\n").split("recipe=")[1]
    with pytest.raises(RecipeError, match="damaged"):
        share.parse_link({"recipe": packed[:-6]})
    with pytest.raises(RecipeError, match="damaged"):
        share.parse_link({"recipe": "%%%not-base64"})
    bomb = base64.urlsafe_b64encode(zlib.compress(b" " * 1_000_000, 9)).decode()
    assert len(bomb) < share.MAX_URL
    with pytest.raises(RecipeError, match="expands beyond 64 KiB"):
        share.parse_link({"recipe": bomb})


def test_base_url() -> None:
    assert share.base_url({"host": "127.0.0.1:7861"}, {}) == "http://127.0.0.1:7861"
    assert share.base_url({"host": "x", "x-forwarded-proto": "https"}, {}) == "https://x"
    assert share.base_url({"host": "x"}, {"SPACE_HOST": "me-app.hf.space"}) == "https://me-app.hf.space"


# ---------------------------------------------------------------- publishing to the recipes dataset

@pytest.fixture
def dataset(hub: HubServer) -> HubServer:
    hub.add_user("maintainer", {"llm-merger": "admin"})
    hub.create_repo(f"datasets/{DATASET}")
    hub.commit_files(f"datasets/{DATASET}", {"README.md": b"---\nlicense: mit\n---\n# Community recipes\n"})
    clear_cache()
    return hub


def test_publish_recipe_opens_a_pull_request(dataset: HubServer) -> None:
    text = gallery_entry("slerp.yml").text
    done = share.publish_recipe(text, "Chat + code, halfway", "Two chat models, blended evenly.\nKeeps norms.",
                                token="hf_bob_write", dataset=DATASET)
    key = f"datasets/{DATASET}"
    assert done.pr_url == f"{dataset.url}/{key}/discussions/1"
    pulls = dataset.pull_requests(key)
    assert [(p.num, p.title, p.author, p.status) for p in pulls] == [(1, "Add recipe: Chat + code, halfway", "bob", "open")]
    assert "Two chat models, blended evenly. Keeps norms." in pulls[0].description
    files = dataset.pr_files(key, 1)
    assert done.path.startswith("recipes/chat-code-halfway-") and done.path.endswith(".yml")
    content = files[done.path].decode()
    assert content == ("# title: Chat + code, halfway\n# description: Two chat models, blended evenly. Keeps norms.\n"
                       + text)
    assert parse_recipe(content).method == "slerp"  # the header is comments: the file is still a recipe
    assert done.path not in dataset.repo_files(key)  # main is untouched until a maintainer merges


def test_publish_recipe_refusals(dataset: HubServer) -> None:
    text = gallery_entry("slerp.yml").text
    with pytest.raises(HubError, match="sign in first"):
        share.publish_recipe(text, "t", "", token=None, dataset=DATASET)
    with pytest.raises(RecipeError, match="short title"):
        share.publish_recipe(text, "  ", "", token="hf_bob_write", dataset=DATASET)
    with pytest.raises(RecipeError, match="local"):
        share.publish_recipe("models:\n  - model: ./here\n  - model: ./there\nmerge_method: linear\n", "t", "",
                             token="hf_bob_write", dataset=DATASET)
    with pytest.raises(HubError, match="was not found"):
        share.publish_recipe(text, "t", "", token="hf_bob_write", dataset="nobody/no-such-dataset")
    assert dataset.stats.requests["commit"] == 0


def test_only_pull_requests_for_non_members(dataset: HubServer) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=dataset.url, token="hf_bob_write")
    op = CommitOperationAdd(path_in_repo="recipes/x.yml", path_or_fileobj=b"merge_method: linear\n")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(DATASET, [op], commit_message="direct", repo_type="dataset")
    assert e.value.response.status_code == 403


def test_gallery_reads_merged_community_recipes(dataset: HubServer) -> None:
    key = f"datasets/{DATASET}"
    text = gallery_entry("linear-70-30.yml").text
    done = share.publish_recipe(text, "Seventy thirty", "For two close fine-tunes.", token="hf_bob_write",
                                dataset=DATASET)
    assert load_community(DATASET) == ()  # not merged yet
    clear_cache()
    dataset.merge_pull(key, 1)
    entries = load_community(DATASET)
    assert [(e.key, e.title, e.when) for e in entries] == [
        (f"community:{done.path}", "Seventy thirty (community)", "For two close fine-tunes.")]
    assert entries[0].text.endswith(text)
    assert gallery_entry(f"community:{done.path}") == entries[0]
    clock = Clock()
    calls = dataset.stats.requests["dataset_info"]
    assert safe_load_community("nobody/absent", clock=clock)[1].startswith(
        "Community recipes from nobody/absent are not available")
    assert dataset.stats.requests["dataset_info"] == calls + 1
    safe_load_community("nobody/absent", clock=clock)  # a failure is remembered: no new request
    assert dataset.stats.requests["dataset_info"] == calls + 1
    clock.now += 301
    safe_load_community("nobody/absent", clock=clock)
    assert dataset.stats.requests["dataset_info"] == calls + 2


def test_recipes_dataset_setting() -> None:
    assert share.recipes_dataset({}) == DATASET
    assert share.recipes_dataset({"MERGER_RECIPES_DATASET": "me/recipes"}) == "me/recipes"


# ---------------------------------------------------------------- the card of a new merge

def test_merge_card_has_lineage_and_remix_link(hub: HubServer, tiny: dict[str, Path], tmp_path: Path) -> None:
    from merger.app.demo import JobRequest
    from merger.pipeline import RunOptions, run

    hub.upload_folder(tiny["base"], "acme/base")
    hub.commit_files("acme/base", {"README.md": model_card(bases=["meta/root"]).encode()})
    hub.upload_folder(tiny["chat"], "acme/chat")
    hub.commit_files("acme/chat", {"README.md": model_card(bases=["acme/base"]).encode()})
    text = ("models:\n  - model: acme/base\n  - model: acme/chat\n    parameters: {weight: 0.5, density: 0.6}\n"
            "merge_method: ties\nbase_model: acme/base\ndtype: float32\n")
    recipe = parse_recipe(text)
    request = JobRequest(recipe, RunOptions(tmp_path / "out", device="cpu", skip_check=True), tmp_path, keep=True)
    state = {"source": "acme/original", "models": ["acme/base", "acme/chat"], "text": text}
    request = remix.apply_remix(request, state, text)
    assert request.options.remixed_from == "acme/original"
    assert remix.apply_remix(request, None, text) is request
    result = run(request.recipe, request.options)
    card = (result.out_dir / "README.md").read_text()
    assert "Remixed from [acme/original](https://huggingface.co/acme/original)" in card
    lineage = card[card.index("## Lineage"):card.index("## Recipe")]
    assert "- [acme/base](https://huggingface.co/acme/base) (ties)\n" in lineage
    assert "  - [meta/root](https://huggingface.co/meta/root) (finetune) — " in lineage  # not on this Hub
    assert "- [acme/chat](https://huggingface.co/acme/chat) (ties)\n" in lineage
    assert "  - [acme/base](https://huggingface.co/acme/base) (finetune) (see above)" in lineage
    plain = run(recipe, RunOptions(tmp_path / "plain", device="cpu", skip_check=True, lineage=False))
    assert "## Lineage" not in (plain.out_dir / "README.md").read_text()
