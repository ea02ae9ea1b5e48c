"""`model+lora` references: a PEFT LoRA adapter applied to its model as the weights are read.

The reference is PEFT itself (merge_and_unload, what mergekit 0.1.5 runs for `model+lora`) and
mergekit's own merge of the same recipe; the adapters are made with PEFT (`init_lora_weights=False`,
so B is not zero), covering attention and MLP targets, rsLoRA with per-module rank/alpha patterns, an
embedding LoRA and a module replaced through modules_to_save.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from merger.app.tiny import make_tiny_model
from merger.check import check_recipe
from merger.errors import MergerError, ModelError, RecipeError
from merger.lora import adapter_problems, load_local_adapter, read_adapter
from merger.pipeline import RunOptions, merge_local, resolve_local, run
from merger.recipe import ModelRef, parse_recipe
from tests.hubserver import hub  # noqa: F401  (fixture)
from tests.test_parity import ulps, weights

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj"],
                   rank_pattern={"gate_proj": 2}, alpha_pattern={"k_proj": 5}),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
}


def _adapter(base: Path, folder: Path, seed: int, **settings) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(init_lora_weights=False, **settings)
    tuned = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "modules_to_save" in name:  # a trained replacement differs from the original
                p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base", "llama", seed=11, tie_word_embeddings=False)
    other = make_tiny_model(root / "other", "llama", perturb_from=base, seed=12, perturb_scale=0.05)
    small = make_tiny_model(root / "small", "llama", seed=13, hidden=32)
    out = {"base": base, "other": other, "small": small}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        out[name] = _adapter(base, root / f"adapter-{name}", 20 + i, **settings)
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapted_weights_equal_peft_merge_and_unload(kind: str, lora_family, tmp_path: Path) -> None:
    base, adapter = lora_family["base"], lora_family[kind]
    recipe = parse_recipe(f"models:\n  - model: {base}+{adapter}\nmerge_method: passthrough\n")
    merge_local(recipe, resolve_local(recipe), tmp_path / "out", device="cpu")
    ours, reference, original = weights(tmp_path / "out"), _peft_merged(base, adapter), weights(base)
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape, name
        assert ulps(tensor, reference[name].to(tensor.dtype)).max() <= 1, name  # PEFT: the same float32 sums
        changed += int(not torch.equal(tensor, original[name]))
    touched = {"plain": 3, "rslora": 3, "embedding": 3}[kind]  # per layer (4 layers), embedding/lm_head once
    assert changed >= touched, changed


def test_scale_follows_rslora_and_the_per_module_patterns(lora_family) -> None:
    adapter = load_local_adapter(lora_family["rslora"], "rslora")
    scales = {name.split(".")[-2]: u.scale for name, u in adapter.updates.items() if ".layers.0." in name}
    assert scales == {"q_proj": 16 / 8 ** 0.5, "k_proj": 5 / 8 ** 0.5, "gate_proj": 16 / 2 ** 0.5}
    plain = load_local_adapter(lora_family["plain"], "plain")
    assert {u.scale for u in plain.updates.values()} == {2.0}


def test_lora_merge_matches_mergekit_end_to_end(lora_family, tmp_path: Path) -> None:
    text = (f"models:\n  - model: {lora_family['base']}+{lora_family['plain']}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {lora_family['other']}+{lora_family['embedding']}\n    parameters: {{weight: 0.4}}\n"
            "merge_method: linear\ndtype: float32\n")
    recipe = parse_recipe(text)
    merge_local(recipe, resolve_local(recipe), tmp_path / "ours", device="cpu")
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                           lora_merge_cache=str(tmp_path / "lora-cache")))
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    plain = weights(lora_family["base"])
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ulps(ours[name], theirs[name]).max() <= 1, name
    assert any(not torch.equal(ours[n], 0.6 * plain[n] + 0.4 * weights(lora_family["other"])[n]) for n in ours)


def test_adapted_rows_do_not_depend_on_the_memory_budget(lora_family, tmp_path: Path) -> None:
    text = (f"models:\n  - model: {lora_family['base']}+{lora_family['embedding']}\n"
            f"  - model: {lora_family['other']}+{lora_family['rslora']}\n"
            "merge_method: slerp\nbase_model: " f"{lora_family['base']}+{lora_family['embedding']}\n"
            "parameters: {t: 0.3}\n")
    recipe = parse_recipe(text)
    merge_local(recipe, resolve_local(recipe), tmp_path / "whole", device="cpu")
    merge_local(recipe, resolve_local(recipe), tmp_path / "blocks", device="cpu", max_memory=3_000)
    whole, blocks = weights(tmp_path / "whole"), weights(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_model_plus_lora_forms() -> None:
    recipe = parse_recipe("models:\n  - model: org/base@v1+org/adapter@abc\n  - model: {model: org/b, lora: org/l}\n"
                          "merge_method: linear\nparameters: {weight: 0.5}\n")
    first, second = (m.model for m in recipe.models)
    assert first == ModelRef("org/base", "v1", False, ModelRef("org/adapter", "abc", False))
    assert str(first) == "org/base@v1+org/adapter@abc" and first.model == ModelRef("org/base", "v1")
    assert second == ModelRef("org/b", None, False, ModelRef("org/l"))
    with pytest.raises(RecipeError, match="one '\\+' between"):
        parse_recipe("models:\n  - model: a/b+c/d+e/f\nmerge_method: passthrough\n")


@pytest.mark.parametrize("config,message", [
    ({"peft_type": "IA3", "r": 4}, "is a IA3 adapter; only LoRA"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA adapter"),
    ({"peft_type": "LORA", "r": 0, "lora_alpha": 8}, "needs a positive integer"),
])
def test_adapters_that_cannot_be_applied_are_refused_in_one_line(lora_family, config, message) -> None:
    headers = load_local_adapter(lora_family["plain"], "x").headers
    with pytest.raises(ModelError, match=message) as e:
        read_adapter(config, headers, "org/adapter")
    assert "\n" not in str(e.value)


def test_check_reads_adapter_headers_only_and_refuses_a_mismatch(hub, lora_family, tmp_path: Path) -> None:
    hub.upload_folder(lora_family["base"], "acme/base")
    hub.upload_folder(lora_family["small"], "acme/small")
    hub.upload_folder(lora_family["plain"], "acme/plain-lora")
    report = check_recipe(parse_recipe("models:\n  - model: acme/base+acme/plain-lora\n  - model: acme/base\n"
                                       "merge_method: linear\nparameters: {weight: 0.5}\n"))
    assert report.ok, report.to_text()
    data = hub.file_bytes("acme/plain-lora", "adapter_model.safetensors")
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    assert hub.stats.bytes_served[("acme/plain-lora", "adapter_model.safetensors")] == header_end < len(data)
    report = check_recipe(parse_recipe("models:\n  - model: acme/small+acme/plain-lora\n"
                                       "merge_method: passthrough\n"))
    errors = [p.message for p in report.problems if p.severity == "error"]
    assert errors and "does not fit the model's" in errors[0] and "trained on another model" in errors[0]
    report = check_recipe(parse_recipe("models:\n  - model: acme/base+acme/small\nmerge_method: passthrough\n"))
    assert any("has no adapter_config.json" in p.message for p in report.problems)


def test_run_fetches_a_hub_adapter_and_merges_as_locally(hub, lora_family, tmp_path: Path) -> None:
    hub.upload_folder(lora_family["base"], "acme/base")
    hub.upload_folder(lora_family["other"], "acme/other")
    hub.upload_folder(lora_family["rslora"], "acme/rslora")
    text = ("models:\n  - model: acme/other+acme/rslora\n    parameters: {weight: 0.7}\n"
            "  - model: acme/base\n    parameters: {weight: 0.3}\nmerge_method: linear\n")
    run(parse_recipe(text), RunOptions(tmp_path / "hub-out", device="cpu", evaluate=False, lineage=False))
    local = parse_recipe(text.replace("acme/other+acme/rslora", f"{lora_family['other']}+{lora_family['rslora']}")
                         .replace("acme/base", str(lora_family["base"])))
    merge_local(local, resolve_local(local), tmp_path / "local-out", device="cpu")
    hub_w, local_w = weights(tmp_path / "hub-out"), weights(tmp_path / "local-out")
    assert all(torch.equal(hub_w[n], local_w[n]) for n in local_w)
    assert "acme/other+acme/rslora" in (tmp_path / "hub-out" / "mergekit_config.yml").read_text()
    assert json.loads((tmp_path / "hub-out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_an_adapter_that_does_not_fit_stops_the_merge_with_one_line(lora_family, tmp_path: Path) -> None:
    recipe = parse_recipe(f"models:\n  - model: {lora_family['small']}+{lora_family['plain']}\n"
                          "merge_method: passthrough\n")
    with pytest.raises(MergerError, match="does not fit the model's") as e:
        merge_local(recipe, resolve_local(recipe), tmp_path / "out", device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert adapter_problems(load_local_adapter(lora_family["plain"], "p"),
                            {"model.layers.0.self_attn.q_proj.weight": (64, 64)})  # others are missing


def test_a_local_adapter_is_refused_where_local_folders_are(lora_family, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="local paths are not allowed"):
        parse_recipe(f"models:\n  - model: org/base+{lora_family['plain']}\nmerge_method: passthrough\n",
                     allow_local=False)
    recipe = parse_recipe(f"models:\n  - model: org/base+{lora_family['plain']}\nmerge_method: passthrough\n")
    with pytest.raises(ModelError, match="local model folders are not allowed"):
        run(recipe, RunOptions(tmp_path / "out", allow_local=False, evaluate=False, lineage=False))
