"""A local merge published with --push names its parents by Hub repo ID and commit, never by local folder
paths: Hub-cache snapshots become `org/name@sha`; a folder with no Hub origin is refused unless
--allow-local-paths (against the local Hub server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file

from merger.card import hub_origin, publishable_recipe
from merger.errors import RecipeError
from merger.pipeline import RunOptions, run
from merger.recipe import ModelRef, load_recipe, parse_recipe
from tests.hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_alice_write"
SHA = "0123456789abcdef0123456789abcdef01234567"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("path,expected", [
    (f"/home/u/.cache/huggingface/hub/models--acme--base/snapshots/{SHA}", ModelRef("acme/base", SHA)),
    (f"/c/models--meta-llama--Llama-2-7b.hf/snapshots/{SHA}/", ModelRef("meta-llama/Llama-2-7b.hf", SHA)),
    (f"models--gpt2/snapshots/{SHA}", ModelRef("gpt2", SHA)),
    (f"/c/models--acme--base/snapshots/{SHA}/sub", None),  # a subfolder is not the repo's model
    (f"/c/models--a--b--c/snapshots/{SHA}", None),  # `--` is not allowed in Hub names
    ("/c/models--acme--base/snapshots/main", None),  # refs are not commits
    (f"/c/datasets--acme--base/snapshots/{SHA}", None),
    ("/home/u/my-merge", None),
])
def test_hub_origin_of_cache_snapshots(path: str, expected: ModelRef | None) -> None:
    assert hub_origin(path) == expected


@pytest.fixture
def cached(hub: HubServer, tiny: dict[str, Path]) -> dict[str, Path]:
    """acme/base and acme/chat on the Hub, downloaded into the Hugging Face cache (as `hf download` does)."""
    hub.upload_folder(tiny["base"], "acme/base")
    hub.upload_folder(tiny["chat"], "acme/chat")
    return {repo: Path(snapshot_download(repo, endpoint=hub.url)) for repo in ("acme/base", "acme/chat")}


def _recipe_file(cached: dict[str, Path]) -> Path:
    """A recipe over the snapshots: one absolute path, one quoted path relative to the recipe's folder."""
    cache = cached["acme/base"].parents[2]
    text = (f"# merged from the cache\nmodels:\n  - model: {cached['acme/base']}\n"
            f"  - model: \"{cached['acme/chat'].relative_to(cache.parent)}\"  # the chat fine-tune\n"
            f"    parameters: {{weight: 0.5, density: 0.6}}\nmerge_method: ties\n"
            f"base_model: {cached['acme/base']}\ndtype: float32\n")
    path = cache.parent / "recipe.yml"
    path.write_text(text)
    return path


def test_snapshot_paths_are_published_as_repo_ids_and_commits(hub: HubServer, cached: dict[str, Path],
                                                             tmp_path: Path) -> None:
    recipe = load_recipe(_recipe_file(cached))
    shas = {repo: folder.name for repo, folder in cached.items()}
    result = run(recipe, RunOptions(tmp_path / "out", device="cpu", token=TOKEN, push="alice/from-cache"))
    assert result.pushed == [f"{hub.url}/alice/from-cache"]
    config = hub.file_bytes("alice/from-cache", "mergekit_config.yml").decode()
    assert config == (f"# merged from the cache\nmodels:\n  - model: acme/base@{shas['acme/base']}\n"
                      f"  - model: acme/chat@{shas['acme/chat']}  # the chat fine-tune\n"
                      f"    parameters: {{weight: 0.5, density: 0.6}}\nmerge_method: ties\n"
                      f"base_model: acme/base@{shas['acme/base']}\ndtype: float32\n")
    card = ModelCard(hub.file_bytes("alice/from-cache", "README.md").decode())
    assert card.data.base_model == ["acme/base", "acme/chat"] and card.data.base_model_relation == "merge"
    assert f"[acme/chat](https://huggingface.co/acme/chat) | [`{shas['acme/chat'][:10]}`]" in card.text
    assert "(local)" not in card.text and config.strip() in card.text
    home = str(cached["acme/base"].parents[3])
    for name in hub.repo_files("alice/from-cache"):  # no file of the public repo names a local folder
        data = hub.file_bytes("alice/from-cache", name)
        assert home.encode() not in data and b"snapshots" not in data, name
    # the published recipe reproduces the merge from the Hub, pinned to the same commits
    again = run(parse_recipe(config), RunOptions(tmp_path / "again", device="cpu", token=TOKEN))
    a, b = weights(result.out_dir), weights(again.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_without_hub_origin_is_refused_before_any_request(hub: HubServer, tiny: dict[str, Path],
                                                                  cached: dict[str, Path], tmp_path: Path) -> None:
    text = (f"models:\n  - model: {cached['acme/base']}\n  - model: {tiny['chat']}\n"
            f"    parameters: {{weight: 0.5, density: 0.6}}\nmerge_method: ties\nbase_model: {cached['acme/base']}\n")
    requests = sum(hub.stats.requests.values())
    with pytest.raises(RecipeError) as e:
        run(parse_recipe(text), RunOptions(tmp_path / "out", device="cpu", token=TOKEN, push="alice/x"))
    line = str(e.value)
    assert "\n" not in line and f"local folder {tiny['chat']}" in line and "--allow-local-paths" in line
    assert sum(hub.stats.requests.values()) == requests and "alice/x" not in hub.repos
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    cli = [sys.executable, "-m", "merger", "run", str(recipe), str(tmp_path / "out"), "--push", "alice/x",
           "--token", TOKEN, "--device", "cpu"]
    env = {**os.environ}
    refused = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: publishing would write the local folder")
    allowed = subprocess.run([*cli, "--allow-local-paths"], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=600)
    assert allowed.returncode == 0, allowed.stderr
    published = hub.file_bytes("alice/x", "mergekit_config.yml").decode()
    sha = cached["acme/base"].name
    assert published == text.replace(str(cached["acme/base"]), f"acme/base@{sha}")  # the one without origin stays
    assert yaml.safe_load(published)["models"][1]["model"] == str(tiny["chat"])


def test_a_snapshot_named_by_another_path_is_refused_with_its_hub_id(cached: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "my-base"
    link.symlink_to(cached["acme/base"], target_is_directory=True)
    text = f"models:\n  - model: {link}\n  - model: {cached['acme/chat']}\nmerge_method: slerp\nbase_model: {link}\n" \
           "parameters: {t: 0.5}\n"
    with pytest.raises(RecipeError) as e:
        publishable_recipe(parse_recipe(text))
    assert f"write 'acme/base@{cached['acme/base'].name}' in the recipe instead" in str(e.value)
    allowed = publishable_recipe(parse_recipe(text), allow_local_paths=True)
    assert str(link) in allowed.text and f"acme/chat@{cached['acme/chat'].name}" in allowed.text


def test_recipes_of_hub_models_are_published_unchanged(hub: HubServer) -> None:
    text = "models:\n  - model: acme/base\n  - model: acme/chat@main\nmerge_method: slerp\nbase_model: acme/base\n" \
           "parameters: {t: 0.5}\n"
    recipe = parse_recipe(text)
    assert publishable_recipe(recipe) is recipe
