"""Architecture tables and inspection, checked against transformers' own models and real checkpoint names."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger import architecture as arch
from merger.errors import ModelError
from merger.sources import TensorHeader, TensorReader
from merger.app.tiny import make_tiny_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, head_dim=8, pad_token_id=0, bos_token_id=0, eos_token_id=0)
# model_type -> (our family name, config overrides for transformers' config class)
TRANSFORMERS_FAMILIES = {
    "llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}), "gemma2": ("gemma2", {}), "gemma3_text": ("gemma3", {}), "phi": ("phi", {}),
    "phi3": ("phi3", {}), "stablelm": ("stablelm", {}), "starcoder2": ("starcoder2", {}),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=100)),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)),
}
# Names copied from real Hub checkpoints' safetensors indexes (one per family), independent of our tables.
HUB_NAMES = {
    "llama": "model.layers.31.self_attn.q_proj.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.7.w3.weight",
    "qwen2": "model.layers.0.self_attn.k_proj.bias",
    "qwen3": "model.layers.0.self_attn.q_norm.weight",
    "gemma2": "model.layers.0.pre_feedforward_layernorm.weight",
    "phi": "model.layers.0.self_attn.dense.weight",
    "phi3": "model.layers.0.mlp.gate_up_proj.weight",
    "gpt2": "transformer.h.0.attn.c_attn.weight",
    "gpt_neox": "embed_out.weight",
    "falcon": "transformer.h.0.self_attention.query_key_value.weight",
    "starcoder2": "model.layers.0.mlp.c_fc.bias",
}


def headers_from(shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> dict[str, TensorHeader]:
    """Synthetic safetensors headers (contiguous offsets in one file), for header-only inspection."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        out[name] = TensorHeader(name, dtype, tuple(shape), "model.safetensors", offset, offset + size)
        offset += size
    return out


def transformers_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, overrides = TRANSFORMERS_FAMILIES[model_type]
    config = AutoConfig.for_model(model_type, **(overrides if overrides else SMALL))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    return config, model


@pytest.mark.parametrize("model_type", sorted(TRANSFORMERS_FAMILIES))
def test_table_matches_transformers_model(model_type: str) -> None:
    """Each family's table names exactly the parameters transformers' own model class has."""
    config, model = transformers_model(model_type)
    family = arch.FAMILY_BY_NAME[TRANSFORMERS_FAMILIES[model_type][0]]
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    cfg = {**config.to_dict(), "architectures": [type(model).__name__]}
    info = arch.model_info_from(cfg, headers_from(shapes), "hf/" + model_type)

    assert info.family is family
    assert info.missing == [] and info.unexpected == []
    assert info.num_layers == 2
    assert info.hidden_size == 32 and info.vocab_size == 100 and info.num_heads == 4
    assert info.embedding_rows == 100
    assert info.tie_word_embeddings == config.tie_word_embeddings
    assert info.param_count == sum(math.prod(s) for s in shapes.values())
    vocab_sized = {n for n in info.tensors if arch.is_embedding(info, n)}
    assert vocab_sized and all(info.tensors[n].shape[0] == 100 for n in vocab_sized)
    assert family.embedding in vocab_sized
    for name in info.tensors:
        expect = int(name.split(".")[2]) if family.layer_prefix in name else None
        assert arch.layer_index(name) == expect, name


def test_mixtral_hub_layout_experts_carry_their_index() -> None:
    """Mixtral checkpoints on the Hub store each expert separately (w1/w2/w3), 8 per layer."""
    shapes = {"model.embed_tokens.weight": (100, 32), "model.norm.weight": (32,), "lm_head.weight": (100, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (32,), p + "post_attention_layernorm.weight": (32,),
                       p + "block_sparse_moe.gate.weight": (3, 32)})
        for proj in "qkvo":
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (32, 32)
        for e in range(3):
            for w, shape in (("w1", (64, 32)), ("w2", (32, 64)), ("w3", (64, 32))):
                shapes[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = shape
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 2,
              "hidden_size": 32, "vocab_size": 100, "num_local_experts": 3}
    info = arch.model_info_from(config, headers_from(shapes), "mistralai/tiny-mixtral")
    assert info.family.name == "mixtral" and info.missing == [] and info.unexpected == []
    assert arch.layer_index("model.layers.1.block_sparse_moe.experts.2.w1.weight") == 1
    del shapes["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    info = arch.model_info_from(config, headers_from(shapes), "x")
    assert info.missing == ["model.layers.1.block_sparse_moe.experts.2.w3.weight"]


@pytest.mark.parametrize("family,name", sorted(HUB_NAMES.items()))
def test_real_checkpoint_names_are_in_tables(family: str, name: str) -> None:
    expected = arch.expected_tensors(arch.FAMILY_BY_NAME[family], 32, 8)
    assert name in expected


def test_family_found_by_architecture_when_model_type_is_unknown() -> None:
    assert arch.find_family({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    assert arch.find_family({"model_type": "gemma3_text"}).name == "gemma3"
    assert arch.find_family({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}) is None


def test_gpt2_names_without_transformer_prefix_are_canonicalised() -> None:
    """openai-community/gpt2 stores `h.0.attn.c_attn.weight`, `wte.weight` and causal-mask buffers."""
    _, model = transformers_model("gpt2")
    shapes = {n.removeprefix("transformer."): tuple(t.shape) for n, t in model.state_dict().items()
              if n != "lm_head.weight"}
    shapes["h.0.attn.bias"] = (1, 1, 64, 64)  # the old causal-mask buffer: never merged
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 32,
              "vocab_size": 100}
    info = arch.model_info_from(config, headers_from(shapes), "gpt2")
    assert info.missing == [] and info.unexpected == []
    assert info.tensors["transformer.h.1.attn.c_attn.weight"].source_name == "h.1.attn.c_attn.weight"
    assert "transformer.h.0.attn.bias" not in info.tensors
    assert info.tie_word_embeddings and info.num_layers == 2


def test_untied_model_without_head_reports_it_missing() -> None:
    config, model = transformers_model("llama")
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}
    info = arch.model_info_from({**config.to_dict(), "tie_word_embeddings": False}, headers_from(shapes), "m")
    assert info.missing == ["lm_head.weight"]
    tied = arch.model_info_from({**config.to_dict(), "tie_word_embeddings": True},
                                headers_from({**shapes, "lm_head.weight": (100, 32)}), "m")
    assert tied.missing == [] and "lm_head.weight" not in tied.tensors


def test_unknown_architecture_is_inferred_from_headers() -> None:
    shapes = {"backbone.embeddings.weight": (100, 32), "backbone.layers.0.mixer.in_proj.weight": (128, 32),
              "backbone.layers.1.mixer.in_proj.weight": (128, 32), "backbone.norm_f.weight": (32,),
              "lm_head.weight": (100, 32)}
    config = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": 100, "hidden_size": 32}
    info = arch.model_info_from(config, headers_from(shapes), "state-spaces/mamba")
    assert info.family is None and info.architecture == "MambaForCausalLM"
    assert info.num_layers == 2 and info.layout.startswith("unknown")
    assert [n for n in info.tensors if arch.is_embedding(info, n)] == ["backbone.embeddings.weight", "lm_head.weight"]


def test_layer_index_and_rename() -> None:
    assert arch.layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert arch.layer_index("transformer.h.3.ln_1.bias") == 3
    assert arch.layer_index("model.embed_tokens.weight") is None
    assert arch.layer_index("lm_head.weight") is None
    assert arch.rename_layer("model.layers.12.block_sparse_moe.experts.12.w1.weight", 40) == \
        "model.layers.40.block_sparse_moe.experts.12.w1.weight"
    with pytest.raises(ValueError):
        arch.rename_layer("model.norm.weight", 1)


def test_output_config_updates_family_keys() -> None:
    gpt2 = {"model_type": "gpt2", "n_layer": 12, "vocab_size": 50257, "torch_dtype": "float32"}
    out = arch.output_config(gpt2, num_layers=20, vocab_size=50260, dtype="BF16")
    assert out["n_layer"] == 20 and "num_hidden_layers" not in out
    assert out["vocab_size"] == 50260 and out["torch_dtype"] == out["dtype"] == "bfloat16"
    assert gpt2["n_layer"] == 12  # the input config is not mutated

    gemma3 = {"model_type": "gemma3_text", "num_hidden_layers": 3, "auto_map": {"AutoModel": "x.Y"},
              "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
    out = arch.output_config(gemma3, num_layers=4, vocab_size=None, dtype="float16", layer_sources=[0, 1, 2, 2],
                             tie_word_embeddings=True)
    assert out["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    assert "auto_map" not in out and out["tie_word_embeddings"] is True
    assert "layer_types" not in arch.output_config(gemma3, num_layers=4, vocab_size=None, dtype=None)


# ---------------------------------------------------------------- legacy phi-2

@pytest.fixture(scope="module")
def phi_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phi")
    new = make_tiny_model(root / "new", "phi", num_layers=2, dtype=torch.float32, seed=3)
    old = make_tiny_model(root / "old", "phi", num_layers=2, dtype=torch.float32, seed=3, layout="legacy")
    return new, old


def test_legacy_phi_is_mapped_to_phi_layout(phi_pair) -> None:
    new_dir, old_dir = phi_pair
    new, old = arch.inspect_local(new_dir), arch.inspect_local(old_dir)
    assert old.layout == "phi-msft (legacy, converted)" and old.converted and old.remote_code
    assert new.layout == "phi (new)" and not new.converted
    assert old.original_config["model_type"] == "phi-msft"
    assert sorted(old.tensors) == sorted(new.tensors)
    assert old.missing == [] and old.unexpected == []
    d = 64
    for part, proj in enumerate("qkv"):
        ref = old.tensors[f"model.layers.1.self_attn.{proj}_proj.weight"]
        assert ref.source_name == "transformer.h.1.mixer.Wqkv.weight"
        assert ref.rows == (part * d, (part + 1) * d) and ref.shape == (d, d)
        bias = old.tensors[f"model.layers.1.self_attn.{proj}_proj.bias"]
        assert bias.rows == (part * d, (part + 1) * d) and bias.shape == (d,)
    assert old.tensors["lm_head.weight"].source_name == "lm_head.linear.weight"
    assert old.tensors["model.final_layernorm.bias"].source_name == "lm_head.ln.bias"
    assert {n: t.shape for n, t in old.tensors.items()} == {n: t.shape for n, t in new.tensors.items()}
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "partial_rotary_factor",
                "layer_norm_eps", "hidden_act", "vocab_size", "tie_word_embeddings"):
        assert old.config[key] == new.config[key], key
    assert "auto_map" not in old.config and old.param_count == new.param_count


def test_legacy_phi_partial_rotary_factor_from_rotary_dim() -> None:
    """microsoft/phi-2's old config: rotary_dim 32 of head size 2560/32 = 80 -> 0.4."""
    config = {"model_type": "phi-msft", "n_embd": 2560, "n_head": 32, "n_layer": 32, "n_inner": None,
              "n_positions": 2048, "rotary_dim": 32, "vocab_size": 51200, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", "auto_map": {"AutoConfig": "configuration_phi.PhiConfig"}}
    out = arch.convert_phi_msft_config(config)
    assert out["partial_rotary_factor"] == pytest.approx(0.4)
    assert out["intermediate_size"] == 10240 and out["num_key_value_heads"] == 32
    assert "auto_map" not in out and out["model_type"] == "phi"


def test_legacy_phi_tensors_read_back_bit_identical(phi_pair) -> None:
    new_dir, old_dir = phi_pair
    original = load_file(str(new_dir / "model.safetensors"))
    info = arch.inspect_local(old_dir)
    with TensorReader(old_dir) as reader:
        for name, ref in info.tensors.items():
            assert torch.equal(reader.read(ref.source_name, ref.rows), original[name]), name


def test_legacy_phi_converted_logits_match_transformers(phi_pair, tmp_path) -> None:
    """The converted folder loads natively in transformers and gives the original model's logits."""
    from transformers import AutoModelForCausalLM

    new_dir, old_dir = phi_pair
    info = arch.inspect_local(old_dir)
    with TensorReader(old_dir) as reader:
        tensors = {n: reader.read(r.source_name, r.rows).contiguous() for n, r in info.tensors.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = arch.output_config(info.config, num_layers=info.num_layers, vocab_size=info.vocab_size, dtype="F32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5


def test_header_only_model_is_inspected(tmp_path) -> None:
    folder = make_tiny_model(tmp_path / "h", "llama", num_layers=2, header_only=True)
    full = make_tiny_model(tmp_path / "f", "llama", num_layers=2)
    a, b = arch.inspect_local(folder, check_size=False), arch.inspect_local(full)
    assert a.missing == [] and a.param_count == b.param_count and a.tensors == b.tensors
    with pytest.raises(ModelError, match="ends past the end of the file"):
        arch.inspect_local(folder)  # what the merge itself sees: the tensor bytes are missing


def test_bin_only_folder_needs_allow_bin(tmp_path) -> None:
    src = make_tiny_model(tmp_path / "src", "llama", num_layers=2)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(str(src / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-bin"):
        arch.inspect_local(folder)
    info = arch.inspect_local(folder, allow_bin=True)
    assert info.files == ["pytorch_model.bin"] and info.missing == []
    assert info.param_count == arch.inspect_local(src).param_count
