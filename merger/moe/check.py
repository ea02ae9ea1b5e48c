"""The pre-flight check of a MoE config, from config.json and safetensors headers only (no weights).

It finds what would stop mergekit-moe after the downloads: models it cannot inspect, architectures
that make no MoE (or one not built here), experts whose MLPs differ in shape from the base model's or
that have fewer layers, a GGUF export the output cannot have; and it gives the same estimates as a
merge's check (merger.check.CheckReport), so the CLI, the app and the disk check read it unchanged.
"""

from __future__ import annotations

import math
from typing import Iterable

from ..architecture import ModelInfo
from ..budget import BASE_RAM
from ..card import ParentInfo, license_conflict
from ..check import (DTYPE_BYTES, ERROR, FLOAT_GGUF, GGUF_BITS, GGUF_WORK_BUFFERS, NOTE, WARNING, CheckReport,
                     Estimates, Inspector, Problem, default_inspector, inspect_all)
from ..errors import MergerError
from ..recipe import ModelRef
from .config import MoERecipe
from .plan import MoEPlan, plan_moe


def check_moe(recipe: MoERecipe, *, inspect: Inspector | None = None, token: str | None = None,
              gguf_types: Iterable[str] | None = None, allow_bin: bool = False,
              max_memory: int | None = None, strict: bool = False) -> CheckReport:
    """Every problem of this MoE config with these models, found from metadata alone. `max_memory` is
    accepted like merger.check.check_recipe's; a MoE copies whole tensors, so it changes nothing.
    `strict` makes the config's warnings (keys mergekit-moe ignores) errors, as for a merge recipe."""
    inspect = inspect or default_inspector(token=token, allow_bin=allow_bin)
    gguf = tuple(t.upper() for t in gguf_types or ())
    problems = [Problem(ERROR if strict else WARNING, w, "remove the key, or check its spelling")
                for w in recipe.warnings]
    models, access, licenses = inspect_all(recipe.referenced_models(), inspect, problems)
    plan = None
    if len(models) == len(recipe.referenced_models()) and not any(p.severity == ERROR for p in problems):
        try:
            plan = plan_moe(recipe, models)
        except MergerError as e:
            problems.append(Problem(ERROR, str(e)))
    if plan is not None:
        problems += _plan_problems(recipe, plan, models)
        if gguf:
            problems += _gguf_problems(recipe, plan)
    conflict = license_conflict([ParentInfo(str(ref), None, lic) for ref, lic in licenses.items() if lic])
    if conflict:
        problems.append(Problem(WARNING, conflict, "check that the licences allow merging and redistribution; "
                                "the card will carry the most restrictive one"))
    estimates = _estimates(recipe, plan, models, gguf) if plan is not None else None
    return CheckReport(recipe, models, access, licenses, list(dict.fromkeys(problems)), estimates, gguf)


def _plan_problems(recipe: MoERecipe, plan: MoEPlan, models: dict[ModelRef, ModelInfo]) -> list[Problem]:
    out = [Problem(NOTE, f"output: {plan.family.architectures[0]} ({plan.architecture}) with "
                         f"{len(recipe.experts)} experts, {recipe.experts_per_token} per token"
                         + (", 1 shared expert" if recipe.shared_experts else "")
                         + f", {plan.num_layers} layers, gates from {recipe.gate_mode}, {plan.out_dtype}")]
    out += [Problem(WARNING, w) for w in plan.warnings]
    for e in recipe.experts + recipe.shared_experts:
        info = models[e.model]
        if info.num_layers > plan.num_layers:
            out.append(Problem(WARNING, f"{e.model} has {info.num_layers} layers; the MoE has the base model's "
                                        f"{plan.num_layers}, so its last {info.num_layers - plan.num_layers} are unused"))
    shared = recipe.shared_experts
    if shared and shared[0].model not in [recipe.base_model] + [e.model for e in recipe.experts]:
        out.append(Problem(NOTE, "mergekit-moe 0.1.5 fails on a shared expert that is neither the base model nor "
                                 "a routed expert (it opens no reader for it); it is built here all the same"))
    if recipe.gate_mode.startswith("hidden"):
        out.append(Problem(NOTE, "hidden gates run the base model on the prompts with transformers (bfloat16) on "
                                 "the merge device"))
    if any(e.noise_scale for e in recipe.experts + shared):
        out.append(Problem(NOTE, "noise_scale noise is drawn from the run's seed here (per tensor); mergekit draws "
                                 "it unseeded, so no two mergekit runs agree on it"))
    return out


def _gguf_problems(recipe: MoERecipe, plan: MoEPlan) -> list[Problem]:
    """What llama.cpp cannot reproduce. Its qwen2moe graph (the pinned llama-cpp-python's) has no tied output
    head and does not renormalise the chosen experts' weights, while mergekit-moe sets norm_topk_prob: with
    fewer experts per token than experts, the GGUF routes differently (measured on a tiny model: KL divergence
    0.04 against the safetensors model, so its verification fails)."""
    from quantize.convert import check_convertible

    drop = "drop the GGUF step; the MoE safetensors still work"
    reason = check_convertible(plan.config)
    out = [Problem(ERROR, f"GGUF export: {reason}", drop)] if reason else []
    if plan.architecture == "Qwen MoE" and plan.config.get("tie_word_embeddings"):
        out.append(Problem(ERROR, "GGUF export: llama.cpp's qwen2moe needs an output head of its own, and this MoE "
                                  "ties it to the embeddings (as its base model does)", drop))
    if plan.architecture == "Qwen MoE" and recipe.experts_per_token < len(recipe.experts):
        out.append(Problem(ERROR, "GGUF export: llama.cpp's qwen2moe does not renormalise the weights of the chosen "
                                  "experts (norm_topk_prob, which mergekit-moe sets), so with "
                                  f"{recipe.experts_per_token} of {len(recipe.experts)} experts per token its "
                                  "output would differ from the model's",
                           f"{drop}, or set experts_per_token: {len(recipe.experts)}"))
    return out


def _estimates(recipe: MoERecipe, plan: MoEPlan, models: dict, gguf: tuple[str, ...]) -> Estimates:
    """A MoE copies whole tensors (no blocks), so its memory does not depend on a budget."""
    download = sum(info.size_bytes for ref, info in models.items() if not ref.local)
    params = sum(math.prod(o.shape) for o in plan.outputs)
    output = params * DTYPE_BYTES.get(plan.out_dtype, 2)
    gguf_files = list(gguf)
    if any(t not in FLOAT_GGUF for t in gguf) and "F16" not in gguf:
        gguf_files.append("F16")
    gguf_bytes = int(sum(params * GGUF_BITS.get(t, 16.0) / 8 for t in gguf_files))
    largest = max((math.prod(o.shape) for o in plan.outputs), default=0)
    working = largest * (4 + 4 + 8)  # the stored tensor, its scaled copy and the output, at most fp32 each
    base = models[recipe.base_model]
    if recipe.gate_mode.startswith("hidden"):
        working += base.param_count * 2  # the base model in bfloat16 for the hidden states
    elif recipe.gate_mode == "cheap_embed":
        working += base.tensors[base.family.embedding].numel * 4
    return Estimates(download_bytes=download, output_bytes=output, gguf_bytes=gguf_bytes,
                     disk_bytes=download + output + gguf_bytes, merge_ram_bytes=BASE_RAM + working,
                     gguf_ram_bytes=largest * 4 * GGUF_WORK_BUFFERS if gguf else 0,
                     merge_vram_bytes=base.param_count * 2 if recipe.gate_mode.startswith("hidden") else 0)
