"""mergekit-moe configs: recognising them among recipes and validating them (pure, no files).

The schema is mergekit 0.1.5's `MoEMergeConfig` (mergekit/moe/config.py): `base_model`, `experts`
(`source_model`, `positive_prompts`, `negative_prompts`, `noise_scale`, `residual_scale`), `gate_mode`,
`dtype`, `experts_per_token` (default 2), `shared_experts` and `architecture`. mergekit drops unknown
keys silently; here they run the same way and each gets a warning with the likely fix. What mergekit
refuses (too few experts, experts without prompts, identical prompts or models for every expert) or
crashes on (an unknown gate_mode) is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import RecipeError
from ..recipe import ModelRef, _suggest, parse_model_ref

TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
# The router initialisations mergekit 0.1.5's get_gate_params knows ("hidden" is its default).
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
RANDOM_GATE_MODES = ("random", "uniform_random")
# mergekit's output architectures, by the name `architecture:` is matched against (case-insensitive prefix).
OUTPUT_ARCHITECTURES = ("Mixtral", "Deepseek MoE", "Qwen MoE", "Qwen3 MoE")
SUPPORTED_ARCHITECTURES = ("Mixtral", "Qwen MoE")
DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_EXPERTS = 64


@dataclass(frozen=True)
class Expert:
    """A model whose MLPs become one expert in every layer, and the prompts that route tokens to it."""

    model: ModelRef
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoERecipe:
    """A mergekit-moe config: the base model's attention and embeddings, the experts' MLPs, routers."""

    base_model: ModelRef
    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...]
    gate_mode: str
    dtype: str | None
    experts_per_token: int
    architecture: str | None
    text: str
    warnings: tuple[str, ...] = field(default=())

    method = "moe"  # what the check, the app and lineage call this kind of recipe

    @property
    def output_dtype(self) -> str | None:
        return self.dtype

    @property
    def gated_experts(self) -> tuple[Expert, ...]:
        """The experts that get a router row, in order: the routed ones, then the shared ones when they
        have prompts or the gates are random (mergekit's rule)."""
        shared = self.shared_experts
        if shared and (shared[0].positive_prompts or self.gate_mode in RANDOM_GATE_MODES):
            return self.experts + shared
        return self.experts

    def referenced_models(self) -> list[ModelRef]:
        """Every model the config needs, base first, each once."""
        refs = [self.base_model] + [e.model for e in self.experts + self.shared_experts]
        return list(dict.fromkeys(refs))

    def with_models(self, mapping: Mapping[ModelRef, ModelRef]) -> "MoERecipe":
        """The same config with model references substituted (Hub IDs -> downloaded folders)."""
        def sub(e: Expert) -> Expert:
            return Expert(mapping.get(e.model, e.model), e.positive_prompts, e.negative_prompts, e.noise_scale,
                          e.residual_scale)

        return MoERecipe(mapping.get(self.base_model, self.base_model), tuple(sub(e) for e in self.experts),
                         tuple(sub(e) for e in self.shared_experts), self.gate_mode, self.dtype,
                         self.experts_per_token, self.architecture, self.text, self.warnings)


def is_moe_config(data: Any) -> bool:
    """A parsed YAML document is a mergekit-moe config when it has `experts` and no `merge_method`."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def _unknown_keys(where: str, mapping: dict, allowed: tuple[str, ...]) -> list[str]:
    hints = {"tokenizer_source": " (mergekit-moe always uses the base model's tokenizer)",
             "tokenizer": " (mergekit-moe always uses the base model's tokenizer)",
             "merge_method": "", "models": " (a MoE config lists `experts`)"}
    return [f"{where}: '{key}' is ignored by mergekit-moe{hints.get(str(key), '')}{_suggest(str(key), allowed)}; "
            "the published model was made without it" for key in mapping if key not in allowed]


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise RecipeError(f"{where} must be a list of prompts, e.g. [\"{value[:30]}\"], not a single string")
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{where} must be a list of strings")
    return tuple(value)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where} must be a number, not {value!r:.40}")
    return float(value)


def _expert(value: Any, where: str, ref: Any, warnings: list[str]) -> Expert:
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping with 'source_model' and prompts, not {type(value).__name__}")
    if "source_model" not in value:
        raise RecipeError(f"{where} has no 'source_model'; name the model whose MLPs this expert takes")
    warnings += _unknown_keys(where, value, EXPERT_KEYS)
    return Expert(ref(value["source_model"], f"{where}.source_model"),
                  _prompts(value.get("positive_prompts"), f"{where}.positive_prompts"),
                  _prompts(value.get("negative_prompts"), f"{where}.negative_prompts"),
                  _number(value.get("noise_scale"), f"{where}.noise_scale"),
                  _number(value.get("residual_scale"), f"{where}.residual_scale"))


def _experts(data: dict, key: str, ref: Any, warnings: list[str]) -> tuple[Expert, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecipeError(f"{key} must be a list of experts (each with source_model and prompts)")
    if len(value) > MAX_EXPERTS:
        raise RecipeError(f"{key} lists {len(value)} experts; at most {MAX_EXPERTS} are supported")
    return tuple(_expert(v, f"{key}[{i}]", ref, warnings) for i, v in enumerate(value))


def parse_moe(data: dict, text: str, *, allow_local: bool = True, base_dir: str | Path | None = None) -> MoERecipe:
    """Validate a mergekit-moe config (already loaded from YAML). Raises RecipeError with one line."""
    bdir = Path(base_dir) if base_dir else None

    def ref(value: Any, where: str) -> ModelRef:
        return parse_model_ref(value, where, allow_local=allow_local, base_dir=bdir)

    warnings = _unknown_keys("the MoE config", data, TOP_KEYS)
    if data.get("base_model") is None:
        raise RecipeError("the MoE config has no 'base_model'; name the model whose attention and embeddings "
                          "the MoE keeps")
    base = ref(data["base_model"], "base_model")
    experts = _experts(data, "experts", ref, warnings)
    if not experts:
        raise RecipeError("the MoE config lists no experts; add 'experts:' entries with source_model and "
                          "positive_prompts")
    shared = _experts(data, "shared_experts", ref, warnings)

    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise RecipeError(f"gate_mode '{gate_mode!s:.40}' is not one of {', '.join(GATE_MODES)}"
                          f"{_suggest(str(gate_mode), GATE_MODES)}")
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int):
        raise RecipeError(f"experts_per_token must be a whole number, not {per_token!r:.40}")
    if per_token < 1:
        raise RecipeError("experts_per_token must be at least 1")
    if per_token > len(experts):
        raise RecipeError(f"experts_per_token is {per_token} but only {len(experts)} expert(s) are listed; "
                          f"lower experts_per_token or add experts")
    dtype = data.get("dtype")
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise RecipeError(f"dtype '{dtype!s:.40}' is not supported by mergekit-moe; use "
                              f"{', '.join(DTYPES[:3])}{_suggest(name, DTYPES)}")
        dtype = name
    architecture = _architecture(data.get("architecture"))

    if gate_mode != "random":  # mergekit refuses these before anything runs (mergekit/moe/config.py)
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise RecipeError(f"experts[{i}] has no positive_prompts; gate_mode {gate_mode} routes tokens "
                                  "by prompts: give each expert prompts of what it is good at (or use "
                                  "gate_mode: random)")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise RecipeError("every expert has the same prompts, so the router cannot tell them apart"
                              + (" (a single expert cannot be routed at all)" if len(experts) == 1 else "")
                              + "; give each of two or more experts prompts of what should be routed to it")
        if all(e.model == experts[0].model for e in experts[1:]):
            raise RecipeError("every expert is the same model: the MoE would compute exactly what that model "
                              "does, with more memory; name different fine-tunes as experts")
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise RecipeError("give prompts to every shared expert or to none, not a mix")
    return MoERecipe(base, experts, shared, gate_mode, dtype, per_token, architecture, text, tuple(warnings))


def _architecture(value: Any) -> str | None:
    if value is None:
        return None
    matches = [a for a in OUTPUT_ARCHITECTURES if a.lower().startswith(str(value).lower())]
    if not isinstance(value, str) or not matches:
        raise RecipeError(f"architecture '{value!s:.40}' is not one of mergekit-moe's output architectures "
                          f"({', '.join(OUTPUT_ARCHITECTURES)})")
    if not any(m in SUPPORTED_ARCHITECTURES for m in matches):
        raise RecipeError(f"architecture '{value}' ({matches[0]}) is not supported here yet; "
                          f"use {' or '.join(SUPPORTED_ARCHITECTURES)} (e.g. architecture: mixtral)")
    return value
