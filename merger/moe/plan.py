"""What a MoE output is made of, from configs and headers alone: its architecture, config.json and tensors.

mergekit 0.1.5 picks the output architecture from its candidates in order (Mixtral, DeepSeek MoE,
Qwen MoE, Qwen3 MoE), preferring Mixtral; `architecture:` narrows the candidates by name prefix
(mergekit/scripts/moe.py). Mixtral takes Llama/Mistral models and no shared expert; Qwen MoE takes
Llama/Mistral/Qwen2 models and exactly one shared expert (with prompts unless the gates are random).
DeepSeek MoE (a shared expert without prompts) and Qwen3 MoE are not built here.

The tensors: every non-MLP weight from the base model, each expert's MLP of every layer from its
source model, one router per layer. Mixtral experts are written one by one in the Hub checkpoints'
layout (`block_sparse_moe.experts.E.w1/w2/w3`), which transformers and llama.cpp's converter read;
mergekit 0.1.5 writes the same numbers in transformers 5's fused layout (`mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..architecture import ModelInfo, expected_tensors
from ..errors import ModelError
from ..families import FAMILY_BY_NAME, Family
from ..recipe import ModelRef
from ..sources import DTYPE_BYTES
from .config import Expert, MoERecipe

_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_PARTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class MoEOutput:
    """One output tensor and where its values come from: a source tensor, a router, or zeros."""

    name: str
    shape: tuple[int, ...]
    source: ModelRef | None = None  # None: a router (gate) or zeros
    source_name: str | None = None  # the canonical tensor name in the source model
    expert: Expert | None = None  # an expert's MLP tensor: its noise_scale / residual_scale apply
    residual: bool = False  # down_proj: residual_scale applies
    gate: tuple[int, str] | None = None  # (layer, "routed" | "shared")


@dataclass
class MoEPlan:
    """Every output tensor, in writing order, with the output's config and dtype."""

    architecture: str  # "Mixtral" or "Qwen MoE"
    family: Family
    config: dict[str, Any]
    out_dtype: str  # torch name
    num_layers: int
    hidden_size: int
    outputs: list[MoEOutput]
    warnings: list[str] = field(default_factory=list)

    @property
    def st_dtype(self) -> str:
        return _ST_DTYPES[self.out_dtype]

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(o.shape) for o in self.outputs) * DTYPE_BYTES[self.st_dtype]


def select_architecture(recipe: MoERecipe, model_types: Mapping[ModelRef, str | None]) -> str:
    """The output architecture mergekit-moe would choose for these models; ModelError when it would
    build none, or one not built here."""
    types = {model_types.get(ref) for ref in recipe.referenced_models()}
    shared = recipe.shared_experts
    gated_shared = bool(shared and shared[0].positive_prompts)
    same = len(types) == 1
    kind = next(iter(types)) if same else None
    supports = {
        "Mixtral": not shared and kind in ("llama", "mistral"),
        "Deepseek MoE": len(shared) <= 1 and not gated_shared and not (shared and shared[0].negative_prompts)
                        and kind in ("llama", "mistral"),
        "Qwen MoE": len(shared) == 1 and (recipe.gate_mode == "random" or gated_shared)
                    and kind in ("llama", "mistral", "qwen2"),
        "Qwen3 MoE": not shared and kind == "qwen3",
    }
    wanted = (recipe.architecture or "").lower()
    candidates = [a for a, ok in supports.items() if ok and a.lower().startswith(wanted)]
    if not candidates:
        if not same:
            found = ", ".join(sorted(str(t) for t in types))
            raise ModelError(f"the base model and the experts have different architectures ({found}); a MoE "
                             "is made of fine-tunes of one architecture")
        if shared and len(shared) > 1:
            raise ModelError(f"{len(shared)} shared experts are listed; Qwen MoE output takes exactly one")
        if kind not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ModelError(f"mergekit-moe builds MoEs from Llama, Mistral or Qwen2 models, not {kind}")
        if shared and not gated_shared and recipe.gate_mode != "random":
            raise ModelError("the shared expert needs positive_prompts for the Qwen MoE router (or use "
                             "gate_mode: random)")
        if kind == "qwen2" and not shared:
            raise ModelError("Qwen2 experts make a Qwen MoE, which needs exactly one shared_experts entry; "
                             "add one (e.g. the base model, with prompts)")
        raise ModelError(f"no MoE output architecture matches architecture: {recipe.architecture}")
    chosen = "Mixtral" if "Mixtral" in candidates else candidates[0]
    if chosen == "Deepseek MoE":
        raise ModelError("mergekit-moe would build a DeepSeek MoE here (a shared expert without prompts), which "
                         "is not supported yet; give the shared expert prompts to get a Qwen MoE, or drop it "
                         "for a Mixtral")
    if chosen == "Qwen3 MoE":
        raise ModelError("Qwen3 experts make a Qwen3 MoE, which is not supported yet; use Llama, Mistral or "
                         "Qwen2 experts")
    return chosen


def out_dtype(recipe: MoERecipe, base: ModelInfo) -> str:
    """mergekit's choice: the config's dtype, else the base config's, else what the base stores."""
    value = recipe.dtype or base.config.get("dtype") or base.config.get("torch_dtype") or base.dtype or "float16"
    return str(value).removeprefix("torch.")


def output_config(architecture: str, base_config: Mapping[str, Any], recipe: MoERecipe, dtype: str) -> dict:
    """config.json of the MoE: the base model's config as a MixtralConfig / Qwen2MoeConfig, the way
    mergekit-moe writes it (only the values that differ from the class defaults)."""
    import transformers

    base = transformers.CONFIG_MAPPING[base_config["model_type"]].from_dict(dict(base_config)).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        base.pop(key, None)
    if architecture == "Mixtral":
        out = transformers.MixtralConfig(**base)
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = len(recipe.experts)
    else:
        out = transformers.Qwen2MoeConfig(**base)
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = len(recipe.experts)
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.moe_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = recipe.experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    return out.to_diff_dict()


def plan_moe(recipe: MoERecipe, infos: Mapping[ModelRef, ModelInfo]) -> MoEPlan:
    """The output's tensors from the models' headers; ModelError for what cannot be assembled."""
    base = infos[recipe.base_model]
    architecture = select_architecture(recipe, {ref: info.model_type for ref, info in infos.items()})
    family = FAMILY_BY_NAME["mixtral" if architecture == "Mixtral" else "qwen2_moe"]
    dtype = out_dtype(recipe, base)
    config = output_config(architecture, base.config, recipe, dtype)
    hidden = int(base.hidden_size or 0)
    outputs: list[MoEOutput] = []
    names = expected_tensors(family, base.num_layers, len(recipe.experts))
    if base.tie_word_embeddings:
        names.pop(family.head[0], None)
    warnings = []
    for name, optional in names.items():
        out = _source(name, recipe, base, infos, architecture, hidden)
        if out is None and not optional:
            raise ModelError(f"{recipe.base_model} has no {name}, which the {architecture} output needs")
        if out is not None:
            outputs.append(out)
    dropped = sorted(n for n in base.tensors if ".mlp." not in n and n not in names)
    if dropped:
        warnings.append(f"{len(dropped)} tensor(s) of the base model have no place in a {architecture} model and "
                        f"are left out, as mergekit-moe does (e.g. {dropped[0]})")
    if len(recipe.experts) & (len(recipe.experts) - 1):
        warnings.append(f"{len(recipe.experts)} experts is not a power of two; mergekit warns that llama.cpp may "
                        "not run such a model")
    return MoEPlan(architecture, family, config, dtype, base.num_layers, hidden, outputs, warnings)


def _source(name: str, recipe: MoERecipe, base: ModelInfo, infos: Mapping[ModelRef, ModelInfo],
            architecture: str, hidden: int) -> MoEOutput | None:
    """Where output tensor `name` comes from (None: absent in the base, and optional)."""
    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") else None
    n_gated = len(recipe.experts)
    if name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")):
        return MoEOutput(name, (n_gated, hidden), gate=(layer, "routed"))
    if name.endswith(".mlp.shared_expert_gate.weight"):
        return MoEOutput(name, (len(recipe.shared_experts), hidden), gate=(layer, "shared"))
    expert, part = None, None
    if ".experts." in name:  # ...block_sparse_moe.experts.E.w1.weight / ...mlp.experts.E.gate_proj.weight
        expert = recipe.experts[int(parts[parts.index("experts") + 1])]
        part = _MIXTRAL_PARTS.get(parts[-2], parts[-2])
    elif ".mlp.shared_expert." in name:
        expert, part = recipe.shared_experts[0], parts[-2]
    if expert is not None:
        source_name = f"model.layers.{layer}.mlp.{part}.weight"
        ref = _expert_tensor(infos[expert.model], source_name, base)
        return MoEOutput(name, ref.shape, expert.model, source_name, expert, residual=part == "down_proj")
    ref = base.tensors.get(name)
    if ref is not None:
        return MoEOutput(name, ref.shape, recipe.base_model, name)
    if architecture == "Qwen MoE" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        weight = base.tensors.get(name[:-len("bias")] + "weight")
        if weight is not None:  # a Llama/Mistral base: Qwen2-MoE attention has biases, so they are zeros
            return MoEOutput(name, (weight.shape[0],))
    return None


def _expert_tensor(info: ModelInfo, name: str, base: ModelInfo) -> Any:
    ref = info.tensors.get(name)
    if ref is None:
        raise ModelError(f"{info.ref} has no {name}; an expert must have the base model's layers "
                         f"({base.num_layers}) and MLP")
    expected = base.tensors.get(name)
    if expected is not None and tuple(ref.shape) != tuple(expected.shape):
        raise ModelError(f"{info.ref}'s {name} is {list(ref.shape)} but the base model's is {list(expected.shape)}; "
                         "experts must be fine-tunes of the base model's size")
    return ref

