"""Architecture families as data: tensor name templates, config keys, embeddings and tying per family.

Supporting a family is one entry here (tests/test_architecture.py and tests/test_gguf_families.py hold
the tables to transformers' own model classes and to checkpoints saved by them); merger.architecture
holds the code that reads these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "FAMILY_BY_NAME", "LLAMA_LAYER", "Family", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor name template: `{i}` stands for the layer index, `{e}` for the expert index."""

    template: str
    optional: bool = False  # absent in some valid variants (bias flags, norm placement)


@dataclass(frozen=True)
class Family:
    """What we know of one architecture family: names, config keys, embeddings, tying."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    pre: tuple[TensorSpec, ...]
    layer: tuple[TensorSpec, ...]
    post: tuple[TensorSpec, ...]
    embedding: str  # the input embedding (rows = vocabulary)
    head: tuple[str, ...]  # the output head tensors (rows = vocabulary); head[0] may be tied
    tie_default: bool  # the config class's default for tie_word_embeddings
    layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    vocab_keys: tuple[str, ...] = ("vocab_size",)
    heads_keys: tuple[str, ...] = ("num_attention_heads",)
    experts_key: str | tuple[str, ...] | None = None  # config key(s) of the expert count, for `{e}` templates
    optional_prefix: str | None = None  # a prefix some checkpoints omit (gpt2: "transformer.")
    aliases: tuple[tuple[str, str], ...] = ()  # (name some savers use, canonical name)
    # (fused tensor, its parts): a tensor some savers write for all experts of a layer at once, read as
    # the canonical per-expert tensors. A 3-D (experts, rows, columns) tensor is split per expert, and
    # each expert's rows into the parts in order; a 2-D one is the single part.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def vocab_tensors(self) -> tuple[str, ...]:
        return (self.embedding, *self.head)

    @property
    def layer_prefix(self) -> str:
        """The text before the layer index in per-layer names, e.g. 'model.layers.'."""
        return self.layer[0].template.split("{i}")[0]


def _specs(prefix: str, names: str, optional: str = "") -> tuple[TensorSpec, ...]:
    """Specs from whitespace-separated names; `optional` lists the ones that may be absent."""
    opt = set(optional.split())
    return tuple(TensorSpec(prefix + n, n in opt) for n in names.split() + sorted(opt - set(names.split())))


LLAMA_LAYER = "model.layers.{i}."  # the layer prefix of Llama-style names
_L = LLAMA_LAYER
_ATTN = "self_attn.q_proj.weight self_attn.k_proj.weight self_attn.v_proj.weight self_attn.o_proj.weight"
_ATTN_BIAS = "self_attn.q_proj.bias self_attn.k_proj.bias self_attn.v_proj.bias"
_MLP = "mlp.gate_proj.weight mlp.up_proj.weight mlp.down_proj.weight"
_MLP_BIAS = "mlp.gate_proj.bias mlp.up_proj.bias mlp.down_proj.bias"
_NORMS = "input_layernorm.weight post_attention_layernorm.weight"
_QK_NORM = "self_attn.q_norm.weight self_attn.k_norm.weight"
_FFN_NORMS = "pre_feedforward_layernorm.weight post_feedforward_layernorm.weight"
_EMBED = _specs("", "model.embed_tokens.weight")
_NORM_HEAD = _specs("", "model.norm.weight lm_head.weight")
_EXPERTS = ("block_sparse_moe.gate.weight block_sparse_moe.experts.{e}.w1.weight "
            "block_sparse_moe.experts.{e}.w2.weight block_sparse_moe.experts.{e}.w3.weight")
_QWEN_EXPERTS = ("mlp.gate.weight mlp.experts.{e}.gate_proj.weight mlp.experts.{e}.up_proj.weight "
                 "mlp.experts.{e}.down_proj.weight")
# transformers 5 holds a layer's experts fused: gate_up_proj (experts, 2 * moe_intermediate, hidden) with
# each expert's [gate; up] rows, down_proj (experts, hidden, moe_intermediate); mergekit 0.1.5 writes that.
_QWEN_FUSED = ((_L + "mlp.experts.gate_up_proj", (_L + "mlp.experts.{e}.gate_proj.weight",
                                                  _L + "mlp.experts.{e}.up_proj.weight")),
               (_L + "mlp.experts.down_proj", (_L + "mlp.experts.{e}.down_proj.weight",)))
_SHARED_EXPERT = ("mlp.shared_expert.gate_proj.weight mlp.shared_expert.up_proj.weight "
                  "mlp.shared_expert.down_proj.weight mlp.shared_expert_gate.weight")
_LB = "{}.weight {}.bias"


def _wb(*modules: str) -> str:
    """'a b' -> 'a.weight a.bias b.weight b.bias': most GPT-style modules carry both."""
    return " ".join(_LB.format(m, m) for m in modules)


def _llama_like(name: str, model_type: str, arch: str, layer: tuple[TensorSpec, ...], tie: bool,
                **extra: Any) -> Family:
    return Family(name, (model_type,), (arch,), _EMBED, layer, _NORM_HEAD, "model.embed_tokens.weight",
                  ("lm_head.weight",), tie, **extra)


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", "llama", "LlamaForCausalLM",
                _specs(_L, f"{_NORMS} {_ATTN} {_MLP}", f"{_ATTN_BIAS} self_attn.o_proj.bias {_MLP_BIAS}"), False),
    _llama_like("mistral", "mistral", "MistralForCausalLM", _specs(_L, f"{_NORMS} {_ATTN} {_MLP}"), False),
    # Mixtral: Hub checkpoints store experts one by one (canonical here, and what llama.cpp reads);
    # transformers 5 holds them fused ([w1; w3] rows per expert, and w2), which is accepted too.
    _llama_like("mixtral", "mixtral", "MixtralForCausalLM", _specs(_L, f"{_NORMS} {_ATTN} {_EXPERTS}"), False,
                experts_key="num_local_experts",
                fused=((_L + "mlp.experts.gate_up_proj", (_L + "block_sparse_moe.experts.{e}.w1.weight",
                                                          _L + "block_sparse_moe.experts.{e}.w3.weight")),
                       (_L + "mlp.experts.down_proj", (_L + "block_sparse_moe.experts.{e}.w2.weight",)),
                       (_L + "mlp.gate.weight", (_L + "block_sparse_moe.gate.weight",)))),
    _llama_like("qwen2", "qwen2", "Qwen2ForCausalLM", _specs(_L, f"{_NORMS} {_ATTN} {_ATTN_BIAS} {_MLP}"), False),
    _llama_like("qwen3", "qwen3", "Qwen3ForCausalLM", _specs(_L, f"{_NORMS} {_ATTN} {_QK_NORM} {_MLP}"), False),
    # Qwen MoE checkpoints on the Hub have experts in every layer (mlp_only_layers empty, sparse step 1)
    _llama_like("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM",
                _specs(_L, f"{_NORMS} {_ATTN} {_ATTN_BIAS} {_QWEN_EXPERTS} {_SHARED_EXPERT}"), False,
                experts_key=("num_experts", "num_local_experts"), fused=_QWEN_FUSED),
    _llama_like("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM",
                _specs(_L, f"{_NORMS} {_ATTN} {_QK_NORM} {_QWEN_EXPERTS}"), False,
                experts_key=("num_experts", "num_local_experts"), fused=_QWEN_FUSED),  # 5 writes num_local_experts
    # OLMo-2 normalises after attention and MLP (no input norm) and over whole q/k projections
    _llama_like("olmo2", "olmo2", "Olmo2ForCausalLM",
                _specs(_L, f"post_attention_layernorm.weight post_feedforward_layernorm.weight {_ATTN} {_QK_NORM} "
                           f"{_MLP}"), False),
    _llama_like("granite", "granite", "GraniteForCausalLM",
                _specs(_L, f"{_NORMS} {_ATTN} {_MLP}", f"{_ATTN_BIAS} self_attn.o_proj.bias {_MLP_BIAS}"), False),
    # Command-R: one LayerNorm (no bias) feeds attention and MLP in parallel; q/k norms in Command-R+
    _llama_like("cohere", "cohere", "CohereForCausalLM", _specs(_L, f"input_layernorm.weight {_ATTN} {_MLP}",
                                                                _QK_NORM), True),
    _llama_like("gemma", "gemma", "GemmaForCausalLM", _specs(_L, f"{_NORMS} {_ATTN} {_MLP}"), True),
    _llama_like("gemma2", "gemma2", "Gemma2ForCausalLM",
                _specs(_L, f"{_NORMS} {_FFN_NORMS} {_ATTN} {_MLP}"), True),
    _llama_like("gemma3", "gemma3_text", "Gemma3ForCausalLM",
                _specs(_L, f"{_NORMS} {_FFN_NORMS} {_ATTN} {_QK_NORM} {_MLP}"), True),
    Family("phi", ("phi",), ("PhiForCausalLM",), _EMBED,
           _specs(_L, _wb("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.dense", "mlp.fc1", "mlp.fc2"),
                  _wb("self_attn.q_layernorm", "self_attn.k_layernorm")),
           _specs("", _wb("model.final_layernorm", "lm_head")), "model.embed_tokens.weight",
           ("lm_head.weight", "lm_head.bias"), False),
    _llama_like("phi3", "phi3", "Phi3ForCausalLM",
                _specs(_L, f"{_NORMS} self_attn.qkv_proj.weight self_attn.o_proj.weight "
                           "mlp.gate_up_proj.weight mlp.down_proj.weight"), False),
    Family("gpt2", ("gpt2",), ("GPT2LMHeadModel",), _specs("", "transformer.wte.weight transformer.wpe.weight"),
           _specs("transformer.h.{i}.", _wb("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")),
           _specs("", f"{_wb('transformer.ln_f')} lm_head.weight"), "transformer.wte.weight", ("lm_head.weight",),
           True, layers_keys=("n_layer",), hidden_keys=("n_embd",), heads_keys=("n_head",),
           optional_prefix="transformer."),
    Family("gpt_neox", ("gpt_neox",), ("GPTNeoXForCausalLM",), _specs("", "gpt_neox.embed_in.weight"),
           _specs("gpt_neox.layers.{i}.", _wb("input_layernorm", "post_attention_layernorm",
                                              "attention.query_key_value", "attention.dense",
                                              "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
           _specs("", f"{_wb('gpt_neox.final_layer_norm')} embed_out.weight"), "gpt_neox.embed_in.weight",
           ("embed_out.weight",), False, aliases=(("lm_head.weight", "embed_out.weight"),)),
    Family("stablelm", ("stablelm",), ("StableLmForCausalLM",), _EMBED,
           _specs(_L, f"input_layernorm.weight input_layernorm.bias {_ATTN} {_MLP}",
                  f"post_attention_layernorm.weight post_attention_layernorm.bias {_ATTN_BIAS}"),
           _specs("", "model.norm.weight model.norm.bias lm_head.weight"), "model.embed_tokens.weight",
           ("lm_head.weight",), False),
    Family("starcoder2", ("starcoder2",), ("Starcoder2ForCausalLM",), _EMBED,
           _specs(_L, f"{_wb('input_layernorm', 'post_attention_layernorm', 'mlp.c_fc', 'mlp.c_proj')} {_ATTN}",
                  f"{_ATTN_BIAS} self_attn.o_proj.bias"),
           _specs("", "model.norm.weight model.norm.bias lm_head.weight"), "model.embed_tokens.weight",
           ("lm_head.weight",), True),
    Family("falcon", ("falcon",), ("FalconForCausalLM",), _specs("", "transformer.word_embeddings.weight"),
           _specs("transformer.h.{i}.", "self_attention.query_key_value.weight self_attention.dense.weight "
                                        "mlp.dense_h_to_4h.weight mlp.dense_4h_to_h.weight",
                  "self_attention.query_key_value.bias self_attention.dense.bias mlp.dense_h_to_4h.bias "
                  f"mlp.dense_4h_to_h.bias {_wb('input_layernorm', 'post_attention_layernorm', 'ln_attn', 'ln_mlp')}"),
           _specs("", f"{_wb('transformer.ln_f')} lm_head.weight"), "transformer.word_embeddings.weight",
           ("lm_head.weight",), True, layers_keys=("num_hidden_layers", "n_layer"),
           heads_keys=("num_attention_heads", "n_head")),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
