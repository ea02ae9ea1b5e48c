"""Tiny models of more families, built with transformers' own config and model classes.

For these families the tensor names, shapes and config keys are whatever transformers' classes give
and `save_pretrained` writes (the checkpoint layout the Hub's repos use), so nothing about the layout
is restated here: only small sizes, the family's tokenizer conventions, and a deterministic
initialisation (the same per-tensor seeded values as merger.app.tiny, scaled so that activations
stay near unit variance at any width). Needs transformers (imported only when such a model is made).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merger.errors import ModelError

__all__ = ["HF_FAMILIES", "make_hf_tiny_model"]


@dataclass(frozen=True)
class HFFamily:
    """One family made with transformers: its model_type, tokenizer spec name and config overrides."""

    model_type: str
    tokens: str  # a key of merger.app.tiny.TOKEN_SPECS
    config: dict = field(default_factory=dict)
    kv_heads: int = 2
    norm_offset: bool = False  # RMSNorm weights used as (1 + w): initialised around 0


# Per family: the config keys that differ from the class defaults at tiny size (expert counts, the
# extra multipliers a family's real checkpoints set, layer patterns).
HF_FAMILIES: dict[str, HFFamily] = {
    "llama3": HFFamily("llama", "llama3", {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    "olmo2": HFFamily("olmo2", "olmo2", {"rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 500000.0}}),
    "granite": HFFamily("granite", "granite", {
        "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
        "attention_multiplier": 0.0625, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    # Command-R (v01: no q/k norms, what llama.cpp loads) and Command-R+ (q/k norms, what mergekit 0.1.5 expects)
    "cohere": HFFamily("cohere", "cohere", {"logit_scale": 0.25, "layer_norm_eps": 1e-5, "use_qk_norm": False,
                                            "tie_word_embeddings": True}),
    "cohere_plus": HFFamily("cohere", "cohere", {"logit_scale": 0.25, "layer_norm_eps": 1e-5, "use_qk_norm": True,
                                                 "tie_word_embeddings": True}),
    "gemma3": HFFamily("gemma3_text", "gemma", {
        "sliding_window": 8, "layer_types": None, "query_pre_attn_scalar": 16, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh"},
        kv_heads=1, norm_offset=True),
    "starcoder2": HFFamily("starcoder2", "starcoder2", {"norm_epsilon": 1e-5, "use_bias": True,
                                                       "sliding_window": None, "hidden_act": "gelu_pytorch_tanh"}),
    "stablelm": HFFamily("stablelm", "stablelm", {"layer_norm_eps": 1e-5, "partial_rotary_factor": 0.25,
                                                 "use_qkv_bias": True, "qk_layernorm": False}),
    "qwen2_moe": HFFamily("qwen2_moe", "qwen2", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": False, "rms_norm_eps": 1e-6, "use_sliding_window": False, "tie_word_embeddings": False}),
    "qwen3_moe": HFFamily("qwen3_moe", "qwen2", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
    "mixtral": HFFamily("mixtral", "llama", {"num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                                            "sliding_window": None, "tie_word_embeddings": False}),
}

_NUM_HEADS = 4


def _kind(name: str, shape: tuple[int, ...], norm_offset: bool) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if len(shape) == 1 and "norm" in name:
        return "norm0" if norm_offset else "norm"
    if len(shape) == 1:
        return "bias"
    return "weight"


def make_hf_tiny_model(folder: Path, family: str, *, seed: int, num_layers: int, hidden: int, vocab: int | None,
                       dtype: torch.dtype, tie_word_embeddings: bool | None, tokenizer: str) -> Path:
    """Write a tiny `family` model (see HF_FAMILIES) into `folder` with transformers' save_pretrained."""
    from merger.app import tiny

    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ModelError(f"tiny {family} models are built with transformers: pip install transformers") from None
    fam = HF_FAMILIES[family]
    if hidden % (2 * _NUM_HEADS):
        raise ModelError(f"hidden must be a multiple of {2 * _NUM_HEADS} (4 heads of even size), got {hidden}")
    size = tiny.write_tokenizer(folder, tiny.TOKEN_SPECS[fam.tokens], tokenizer, family)
    vocab = size if vocab is None else vocab
    if vocab < size:
        raise ModelError(f"vocab {vocab} is smaller than the tokenizer's {size} tokens")
    ids = tiny.special_ids(tiny.TOKEN_SPECS[fam.tokens])
    settings = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": num_layers,
        "num_attention_heads": _NUM_HEADS, "num_key_value_heads": fam.kv_heads, "head_dim": hidden // _NUM_HEADS,
        "max_position_embeddings": 2048, **ids, **fam.config,
    }
    if tie_word_embeddings is not None:
        settings["tie_word_embeddings"] = tie_word_embeddings
    config = AutoConfig.for_model(fam.model_type, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tiny.init_tensor(name, tuple(param.shape), _kind(name, tuple(param.shape), fam.norm_offset),
                                         seed))
    model.to(dtype)
    model.generation_config.update(**{k: v for k, v in ids.items() if v is not None})
    model.save_pretrained(folder)
    # transformers records where it saved from; a Hub checkpoint has no local path in its config
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("_name_or_path", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return folder
