"""Legacy Phi-2 (phi-msft) against a reference built without merger's own mapping.

The checkpoints are written from the names of the published phi-msft modelling code (microsoft/phi-2's
remote `modeling_phi.py` before the 2024 conversion: `PhiForCausalLM.transformer` = `embd.wte` + blocks
`h.N` of `ln`, `mixer` (MHA: `Wqkv` whose output is rearranged "(three h d) -> three h d", i.e. rows
[q | k | v], and `out_proj`) and `mlp` (`fc1`, `fc2`); `lm_head` = `ln` + `linear`) and its config keys
(`n_embd`, `n_head`, `rotary_dim`, ...). Random tensors, not merger's tiny-model generator.

The expected result: each legacy checkpoint loaded by transformers' own weight-conversion engine
(WeightRenaming / WeightConverter + Chunk, the mechanism transformers 5 uses for legacy layouts) into its
native PhiForCausalLM, its state dict saved in the new layout, and those folders merged by mergekit 0.1.5.
(transformers <= 4.x shipped models/phi/convert_phi_weights_to_hf.py, which maps Wqkv to a fused,
head-interleaved `query_key_value` that no current PhiForCausalLM has; transformers 5 dropped it.)
Our merge reads the legacy folders directly; tensors and logits must match mergekit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import PhiConfig, PhiForCausalLM
from transformers import conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

from merger.pipeline import merge_local, resolve_local
from merger.recipe import parse_recipe

N_EMBD, N_HEAD, N_LAYER, N_INNER, ROTARY_DIM, VOCAB = 64, 4, 2, 256, 8, 320

# phi-msft's configuration_phi.PhiConfig keys, as a microsoft/phi-2 config.json of 2023 spelled them
LEGACY_CONFIG = {
    "_name_or_path": "microsoft/phi-2", "activation_function": "gelu_new", "architectures": ["PhiForCausalLM"],
    "attn_pdrop": 0.0, "auto_map": {"AutoConfig": "configuration_phi.PhiConfig",
                                    "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
    "embd_pdrop": 0.0, "flash_attn": False, "flash_rotary": False, "fused_dense": False, "img_processing": None,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "phi-msft", "n_embd": N_EMBD,
    "n_head": N_HEAD, "n_head_kv": None, "n_inner": N_INNER, "n_layer": N_LAYER, "n_positions": 2048,
    "resid_pdrop": 0.1, "rotary_dim": ROTARY_DIM, "tie_word_embeddings": False, "torch_dtype": "float32",
    "vocab_size": VOCAB,
}

# The legacy names -> transformers' PhiForCausalLM, in transformers' own conversion vocabulary.
TRANSFORMERS_PHI_MSFT_MAPPING = [
    WeightRenaming(r"^transformer\.embd\.wte\.", "model.embed_tokens."),
    WeightRenaming(r"^lm_head\.ln\.", "model.final_layernorm."),
    WeightRenaming(r"^lm_head\.linear\.", "lm_head."),
    WeightRenaming(r"^transformer\.h\.", "model.layers."),
    WeightRenaming(r"\.ln\.", ".input_layernorm."),
    WeightRenaming(r"\.mixer\.out_proj\.", ".self_attn.dense."),
    WeightConverter("mixer.Wqkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    operations=[Chunk(dim=0)]),
]


def legacy_tensors(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (0.01 if base else 0.2)

    shapes = {"transformer.embd.wte.weight": (VOCAB, N_EMBD), "lm_head.ln.weight": (N_EMBD,),
              "lm_head.ln.bias": (N_EMBD,), "lm_head.linear.weight": (VOCAB, N_EMBD), "lm_head.linear.bias": (VOCAB,)}
    for i in range(N_LAYER):
        block = f"transformer.h.{i}."
        shapes.update({block + "ln.weight": (N_EMBD,), block + "ln.bias": (N_EMBD,),
                       block + "mixer.Wqkv.weight": (3 * N_EMBD, N_EMBD), block + "mixer.Wqkv.bias": (3 * N_EMBD,),
                       block + "mixer.out_proj.weight": (N_EMBD, N_EMBD), block + "mixer.out_proj.bias": (N_EMBD,),
                       block + "mlp.fc1.weight": (N_INNER, N_EMBD), block + "mlp.fc1.bias": (N_INNER,),
                       block + "mlp.fc2.weight": (N_EMBD, N_INNER), block + "mlp.fc2.bias": (N_EMBD,)})
    out = {}
    for name, shape in shapes.items():
        offset = 1.0 if name.endswith("ln.weight") and base is None else 0.0  # layer norm gains near 1
        out[name] = (base[name] if base else offset) + r(*shape)
    return out


def transformers_config() -> PhiConfig:
    """The native config of the same model, from the phi-msft keys (head size n_embd / n_head)."""
    return PhiConfig(vocab_size=VOCAB, hidden_size=N_EMBD, intermediate_size=N_INNER, num_hidden_layers=N_LAYER,
                     num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD, hidden_act="gelu_new",
                     max_position_embeddings=2048, layer_norm_eps=1e-05, tie_word_embeddings=False,
                     partial_rotary_factor=ROTARY_DIM / (N_EMBD // N_HEAD), resid_pdrop=0.1)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phi-msft")
    base = legacy_tensors(0)
    folders = {}
    for name, tensors in (("base", base), ("ft1", legacy_tensors(1, base)), ("ft2", legacy_tensors(2, base))):
        folder = root / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(LEGACY_CONFIG, indent=2))
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def converted(legacy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same checkpoints, converted by transformers' loader and saved in the new layout."""
    conversion_mapping.get_checkpoint_conversion_mapping("phi")  # builds transformers' table once
    table = conversion_mapping._checkpoint_conversion_mapping_cache
    assert "phi" not in table  # transformers has no phi mapping of its own that this would hide
    root = tmp_path_factory.mktemp("phi-converted")
    out = {}
    try:
        table["phi"] = TRANSFORMERS_PHI_MSFT_MAPPING
        for name, folder in legacy.items():
            model, info = PhiForCausalLM.from_pretrained(folder, config=transformers_config(), dtype=torch.float32,
                                                         output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            out[name] = root / name
            out[name].mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out[name] / "model.safetensors"),
                      metadata={"format": "pt"})
            config = transformers_config().to_dict()
            config["architectures"] = ["PhiForCausalLM"]
            (out[name] / "config.json").write_text(json.dumps(config, indent=2))
    finally:
        table.pop("phi", None)
    return out


RECIPE = """models:
  - model: {base}
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: ties
base_model: {base}
dtype: float32
"""


def test_the_conversion_reference_splits_wqkv_into_thirds(legacy: dict[str, Path], converted: dict[str, Path]) -> None:
    old, new = load_file(legacy["ft1"] / "model.safetensors"), load_file(converted["ft1"] / "model.safetensors")
    qkv = old["transformer.h.1.mixer.Wqkv.weight"]
    assert torch.equal(new["model.layers.1.self_attn.k_proj.weight"], qkv[N_EMBD:2 * N_EMBD])
    assert torch.equal(new["model.layers.0.input_layernorm.bias"], old["transformer.h.0.ln.bias"])
    assert len(new) == len(old) + 2 * 2 * N_LAYER  # Wqkv weight and bias become three tensors each


def test_legacy_merge_equals_mergekit_on_the_transformers_conversion(
        legacy: dict[str, Path], converted: dict[str, Path], tmp_path: Path) -> None:
    theirs_dir = tmp_path / "mergekit"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(RECIPE.format(**converted))), str(theirs_dir),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    recipe = parse_recipe(RECIPE.format(**legacy))
    merge_local(recipe, resolve_local(recipe), tmp_path / "ours", device="cpu")
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), {}
    for f in sorted(theirs_dir.glob("*.safetensors")):
        theirs.update(load_file(f))
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
    assert "auto_map" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    config, expected = PhiConfig.from_pretrained(tmp_path / "ours").to_dict(), transformers_config().to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_parameters", "layer_norm_eps", "hidden_act", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == expected[key], key
    ids = torch.tensor([[1, 17, 5, 250, 99, 3, 42]])
    with torch.no_grad():
        got = PhiForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)(ids).logits
        want = PhiForCausalLM.from_pretrained(theirs_dir, config=transformers_config(), dtype=torch.float32)(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
