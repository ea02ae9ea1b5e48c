"""merger.card: front matter the Hub accepts, lineage, licences, GGUF table, usage and reproduction."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import get_session

from merger.card import (
    METHOD_SENTENCES, RECIPE_FILE, TOOL_TAG, GGUFFileInfo, ParentInfo, build_card, build_gguf_card,
    license_conflict, merged_license)
from merger.methods import METHODS
from merger.recipe import InputModel, ModelRef, Recipe, parse_recipe
from tests.hubserver import HubServer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "recipes"
LLAMA = [ParentInfo("meta-llama/Llama-2-7b-hf", "1" * 40, "llama2"),
         ParentInfo("meta-llama/Llama-2-7b-chat-hf", "2" * 40, "llama2"),
         ParentInfo("epfl-llm/meditron-7b", "3" * 40, "llama2")]
GGUF = [GGUFFileInfo("med-F16.gguf", "F16", 13_500_000_000), GGUFFileInfo("med-Q4_K_M.gguf", "Q4_K_M", 4_080_000_000)]


def recipe(name: str) -> Recipe:
    return parse_recipe((SHARED / name).read_text(), allow_local=False)


def validate(server: HubServer, card: ModelCard) -> tuple[int, dict]:
    """POST the card to the Hub's validate-yaml endpoint, as huggingface_hub's upload path does."""
    response = get_session().post(f"{server.url}/api/validate-yaml", json={"content": str(card), "repoType": "model"})
    return response.status_code, response.json()


def test_front_matter_declares_the_merge(hub: HubServer) -> None:
    card = build_card(recipe("medical-dare-ties.yml"), parents=LLAMA, output_name="alice/med", gguf_files=GGUF,
                      gguf_repo="alice/med-GGUF")
    data = card.data.to_dict()
    assert data["base_model"] == [p.repo for p in LLAMA]
    assert data["base_model_relation"] == "merge"
    assert data["license"] == "llama2" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["merge", "mergekit", TOOL_TAG, "dare_ties", "gguf"]
    assert ModelCard(str(card)).data.to_dict() == data  # round-trips through the Hub's parser
    assert validate(hub, card) == (200, {"errors": [], "warnings": []})


def test_body_has_lineage_recipe_usage_and_reproduction() -> None:
    r = recipe("medical-ties.yml")
    text = str(build_card(r, parents=LLAMA, output_name="alice/med", gguf_files=GGUF, gguf_repo="alice/med-GGUF",
                          sanity={"perplexity (wikitext, 1k tokens)": 6.12345, "greedy sample": "Paris | France"}))
    assert "[TIES](https://arxiv.org/abs/2306.01708) method, which " + METHOD_SENTENCES["ties"] in text
    assert ("| [epfl-llm/meditron-7b](https://huggingface.co/epfl-llm/meditron-7b) | [`3333333333`]"
            "(https://huggingface.co/epfl-llm/meditron-7b/tree/" + "3" * 40 + ") | merged | density=0.8, weight=0.5 |"
            in text)
    assert "| base | - |" in text
    assert "Merge settings: `normalize: false`, `int8_mask: true`, `dtype: float16`." in text
    assert "```yaml\n" + r.text.rstrip("\n") + "\n```" in text
    assert ("| [med-Q4_K_M.gguf](https://huggingface.co/alice/med-GGUF/blob/main/med-Q4_K_M.gguf) | Q4_K_M | "
            "4.08 GB | recommended balance of size and quality |") in text
    assert "| med-F16.gguf" not in text and "| F16 | 13.50 GB | full quality |" in text
    assert 'model_id = "alice/med"' in text
    assert 'llama-cli -hf alice/med-GGUF:Q4_K_M' in text
    assert "llama-cli --hf-repo alice/med-GGUF --hf-file " in text and "llama-server --hf-repo alice/med-GGUF" in text
    assert 'Llama.from_pretrained(repo_id="alice/med-GGUF", filename="med-Q4_K_M.gguf")' in text
    assert "| perplexity (wikitext, 1k tokens) | 6.123 |" in text and "| greedy sample | Paris \\| France |" in text
    assert ("lm_eval --model hf --model_args pretrained=alice/med,dtype=auto "
            "--tasks arc_challenge,hellaswag,mmlu --batch_size auto") in text
    assert f"python -m merger run {RECIPE_FILE} OUT\n" in text
    assert "Licence warning" not in text


def test_gradients_filters_and_seed_are_shown() -> None:
    text = str(build_card(recipe("slerp-q-proj-only.yml"), parents=LLAMA[1:], output_name="x"))
    assert "`t: q_proj: 0.5; else 0`" in text
    text = str(build_card(recipe("slerp-gradient.yml"), parents=LLAMA[1:], output_name="x"))
    assert "`t: [0, 0.5, 0.3, 0.7, 1]`" in text and "`dtype: bfloat16`" in text
    assert "OUT --seed 7" in str(build_card(recipe("medical-dare-ties.yml"), parents=LLAMA, output_name="x", seed=7))
    assert "--seed" not in str(build_card(recipe("medical-ties.yml"), parents=LLAMA, output_name="x", seed=7))


def test_slices_show_layer_ranges() -> None:
    r = parse_recipe("slices:\n  - sources:\n      - model: a/one\n        layer_range: [0, 16]\n"
                     "  - sources:\n      - model: b/two\n        layer_range: [8, 24]\nmerge_method: passthrough\n",
                     allow_local=False)
    text = str(build_card(r, parents=[ParentInfo("a/one", "a" * 40, "mit"), ParentInfo("b/two", None, "mit")],
                          output_name="x"))
    assert "| 0 | [a/one](https://huggingface.co/a/one) | [`aaaaaaaaaa`]" in text and "| 0-15 | - |" in text
    assert "| 1 | [b/two](https://huggingface.co/b/two) | - | 8-23 | - |" in text


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_described_with_its_paper(method: str) -> None:
    r = Recipe(method, None, (InputModel(ModelRef("a/one")), InputModel(ModelRef("b/two"))), None, {}, None, None,
               None, None, f"merge_method: {method}\n")
    text = str(build_card(r, parents=[], output_name="x"))
    assert f"[{METHODS[method].pretty_name}]({METHODS[method].paper}) method, which {METHOD_SENTENCES[method]}." in text


def test_method_sentences_cover_exactly_the_registry() -> None:
    assert set(METHOD_SENTENCES) == set(METHODS)


@pytest.mark.parametrize("licenses,expected", [
    (["apache-2.0", "mit"], "apache-2.0"),
    (["apache-2.0", "llama2"], "llama2"),
    (["mit", "cc-by-nc-4.0", "llama3"], "cc-by-nc-4.0"),
    (["gpl-3.0", "mpl-2.0"], "gpl-3.0"),
    (["llama2", "gemma"], "llama2"),  # equal rank: the first parent's
])
def test_most_restrictive_license_wins(licenses: list[str], expected: str) -> None:
    parents = [ParentInfo(f"org/m{i}", None, lic) for i, lic in enumerate(licenses)]
    assert merged_license(parents).license == expected


def test_license_conflicts() -> None:
    assert license_conflict([ParentInfo("a/x", None, "apache-2.0"), ParentInfo("b/y", None, "llama2")]) is None
    assert license_conflict([ParentInfo("a/x", None, "llama2"), ParentInfo("b/y", None, "llama2")]) is None
    clash = license_conflict([ParentInfo("a/x", None, "llama2"), ParentInfo("b/y", None, "gemma")])
    assert clash == ("the parents' licences differ (llama2: a/x; gemma: b/y) and the merge must satisfy all of "
                     "them; check the licences before publishing")
    assert "b/y declares no licence" in license_conflict([ParentInfo("a/x", None, "mit"), ParentInfo("b/y", None, None)])
    assert "forbid derivatives" in license_conflict([ParentInfo("a/x", None, "cc-by-nd-4.0")])
    assert license_conflict([ParentInfo("a/x", None, "other", "foo-1"), ParentInfo("b/y", None, "other", "bar")])
    assert license_conflict([ParentInfo("/models/local", None, None, local=True)]) is None


def test_conflict_is_warned_in_the_card_and_card_still_validates(hub: HubServer) -> None:
    parents = [ParentInfo("meta-llama/Llama-2-7b-chat-hf", None, "llama2"),
               ParentInfo("epfl-llm/meditron-7b", None, "other", "meditron-license", "https://example.org/l")]
    card = build_card(recipe("chat-slerp.yml"), parents=parents, output_name="alice/x")
    assert "> **Licence warning:** the parents' licences differ" in str(card)
    data = card.data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "meditron-license", "https://example.org/l")
    assert validate(hub, card)[0] == 200


def test_other_license_without_name_becomes_unknown(hub: HubServer) -> None:
    card = build_card(recipe("chat-slerp.yml"), parents=[ParentInfo("meta-llama/Llama-2-7b-chat-hf", None, "other"),
                                                         ParentInfo("epfl-llm/meditron-7b", None, "mit")],
                      output_name="x")
    assert card.data.license == "unknown" and validate(hub, card)[0] == 200


def test_local_parents_are_listed_but_not_declared_as_base_models(hub: HubServer) -> None:
    r = parse_recipe("models:\n  - model: /tmp/x/local-model\n  - model: a/hub-model\nmerge_method: linear\n"
                     "parameters: {weight: 1}\n",
                     allow_local=True)
    parents = [ParentInfo("/tmp/x/local-model", None, None, local=True), ParentInfo("a/hub-model", "f" * 40, "mit")]
    card = build_card(r, parents=parents, output_name="local-out")
    assert card.data.base_model == ["a/hub-model"] and card.data.license == "mit"
    assert "| `local-model` (local) | - | merged | - |" in str(card)
    assert validate(hub, card)[0] == 200


def test_validator_enforces_the_hub_rules(hub: HubServer) -> None:
    bad = ModelCard("---\nlicense: llama-2\nbase_model: [1]\nbase_model_relation: merged\n---\n# x\n")
    status, body = validate(hub, bad)
    assert status == 400
    assert [e["message"] for e in body["errors"]] == [
        '"license" must be one of the Hub licence identifiers; "llama-2" is not',
        '"base_model" must be a string or a list of strings',
        '"base_model_relation" must be one of adapter, merge, quantized, finetune']


def test_card_goes_through_the_clients_upload_validation(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token="hf_alice_write")
    api.create_repo("alice/card")
    good = build_card(recipe("medical-linear.yml"), parents=LLAMA[1:], output_name="alice/card")
    api.upload_file(path_or_fileobj=str(good).encode(), path_in_repo="README.md", repo_id="alice/card")
    assert api.model_info("alice/card").card_data.base_model == [p.repo for p in LLAMA[1:]]
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: nope\n---\n", path_in_repo="README.md", repo_id="alice/card")


def test_gguf_card_and_file_info(hub: HubServer, tmp_path: Path) -> None:
    path = tmp_path / "med-q5_k_m.gguf"
    path.write_bytes(b"GGUF" + bytes(2044))
    info = GGUFFileInfo.from_path(path)
    assert info == GGUFFileInfo("med-q5_k_m.gguf", "Q5_K_M", 2048)
    main = build_card(recipe("medical-ties.yml"), parents=LLAMA, output_name="alice/med", gguf_files=[info])
    card = build_gguf_card(main, model_repo="alice/med", gguf_repo="alice/med-GGUF", gguf_files=[info])
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"], data["license"]) == ("alice/med", "quantized", "llama2")
    assert TOOL_TAG in data["tags"] and "gguf" in data["tags"]
    assert "| Q5_K_M | 2.05 kB | high quality, a good default if it fits |" in str(card)
    assert "llama-cli -hf alice/med-GGUF:Q5_K_M" in str(card)
    assert validate(hub, card)[0] == 200
